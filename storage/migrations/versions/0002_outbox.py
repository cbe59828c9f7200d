"""outbox: one delivery row per (job, destination), destinations' up/down state, the job's instance count

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'outbox',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('files', sa.Text(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=False),
        sa.Column('claimed_by', sa.String(length=64), nullable=False),
        sa.Column('claim_expires_at', sa.DateTime(), nullable=True),
        sa.Column('sent_at', sa.DateTime(), nullable=True),
        sa.Column('transaction_uid', sa.String(length=64), nullable=False),
        sa.Column('commit_deadline', sa.DateTime(), nullable=True),
        sa.Column('commit_requests', sa.Integer(), nullable=False),
        sa.Column('committed_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_job_id', ['job_id'], unique=False)
        batch_op.create_index('ix_outbox_destination', ['destination'], unique=False)
        batch_op.create_index('ix_outbox_state', ['state'], unique=False)
        batch_op.create_index('ix_outbox_transaction_uid', ['transaction_uid'], unique=False)
        batch_op.create_index('ix_outbox_dest_state_due', ['destination', 'state', 'next_attempt_at'], unique=False)
    op.create_table(
        'destinations',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('up', sa.Boolean(), nullable=False),
        sa.Column('since', sa.DateTime(), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=False),
        sa.Column('last_ok_at', sa.DateTime(), nullable=True),
        sa.Column('down_notified', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('n_instances', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('n_instances')
    op.drop_table('destinations')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        for ix in ('ix_outbox_dest_state_due', 'ix_outbox_transaction_uid', 'ix_outbox_state',
                   'ix_outbox_destination', 'ix_outbox_job_id'):
            batch_op.drop_index(ix)
    op.drop_table('outbox')
