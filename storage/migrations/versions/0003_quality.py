"""quality gate: per-structure verdicts, the job's verdict and its review

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('quality_checks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('structure', sa.String(length=32), nullable=False),
    sa.Column('verdict', sa.String(length=8), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('metrics', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_quality_checks_job_id'), 'quality_checks', ['job_id'], unique=False)
    op.add_column('jobs', sa.Column('quality', sa.String(length=8), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('review', sa.String(length=16), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('reviewed_by', sa.String(length=128), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('reviewed_from', sa.String(length=64), nullable=False, server_default=''))
    op.add_column('jobs', sa.Column('reviewed_at', sa.DateTime(), nullable=True))
    op.add_column('jobs', sa.Column('review_note', sa.Text(), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        for col in ('review_note', 'reviewed_at', 'reviewed_from', 'reviewed_by', 'review', 'quality'):
            batch.drop_column(col)
    op.drop_index(op.f('ix_quality_checks_job_id'), table_name='quality_checks')
    op.drop_table('quality_checks')
