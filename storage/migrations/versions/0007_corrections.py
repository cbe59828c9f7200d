"""corrections received from viewers, and the model registry

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('corrections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('seg_series_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=True),
    sa.Column('series_id', sa.Integer(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('creator', sa.String(length=64), nullable=False),
    sa.Column('station', sa.String(length=128), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('content_at', sa.DateTime(), nullable=True),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('labels_path', sa.Text(), nullable=False),
    sa.Column('metrics', sa.Text(), nullable=False),
    sa.Column('mean_dice', sa.Float(), nullable=True),
    sa.Column('holdout', sa.Boolean(), nullable=False),
    sa.Column('holdout_round', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_uid')
    )
    op.create_index(op.f('ix_corrections_instance_id'), 'corrections', ['instance_id'], unique=False)
    op.create_index(op.f('ix_corrections_series_id'), 'corrections', ['series_id'], unique=False)
    op.create_index(op.f('ix_corrections_job_id'), 'corrections', ['job_id'], unique=False)
    op.create_index(op.f('ix_corrections_state'), 'corrections', ['state'], unique=False)
    op.create_index(op.f('ix_corrections_received_at'), 'corrections', ['received_at'], unique=False)
    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('card', sa.Text(), nullable=False),
    sa.Column('parent', sa.String(length=64), nullable=False),
    sa.Column('trained_on', sa.Text(), nullable=False),
    sa.Column('held_out', sa.Text(), nullable=False),
    sa.Column('metrics', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('promoted_at', sa.DateTime(), nullable=True),
    sa.Column('promoted_by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version')
    )
    op.create_index(op.f('ix_model_versions_sha256'), 'model_versions', ['sha256'], unique=False)
    op.create_index(op.f('ix_model_versions_state'), 'model_versions', ['state'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_model_versions_state'), table_name='model_versions')
    op.drop_index(op.f('ix_model_versions_sha256'), table_name='model_versions')
    op.drop_table('model_versions')
    for col in ('received_at', 'state', 'job_id', 'series_id', 'instance_id'):
        op.drop_index(op.f(f'ix_corrections_{col}'), table_name='corrections')
    op.drop_table('corrections')
