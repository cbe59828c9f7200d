"""completion: expected counts from the routing PACS and the images, quiet period after aborts and crashes

Revision ID: 0004
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expected_count', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('expected_from', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('expected_held', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('quiet_until', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('fetch_attempts', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('images_in_acquisition', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('acquisition_number', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('acquisition_number')
        batch_op.drop_column('images_in_acquisition')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('fetch_attempts')
        batch_op.drop_column('quiet_until')
        batch_op.drop_column('expected_held')
        batch_op.drop_column('expected_from')
        batch_op.drop_column('expected_count')
