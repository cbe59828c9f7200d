"""file paths stored relative to the data folder

Instance files, job results and the outbox's files were stored as absolute paths, so a data folder restored
to or mounted at another path found none of them. Paths under the node's data folder become relative to it;
paths elsewhere stay absolute (and are still read where they point). The data folder comes from the node
(``Database.create_schema(data_dir)``) or, run by hand, ``alembic -x data_dir=PATH upgrade head``.

Revision ID: 0006
Revises: 0003
"""

import json
import os

import sqlalchemy as sa
from alembic import context, op

revision = '0006'
down_revision = '0003'
branch_labels = None
depends_on = None

instances = sa.table('instances', sa.column('id', sa.Integer), sa.column('path', sa.Text))
jobs = sa.table('jobs', sa.column('id', sa.Integer), sa.column('seg_path', sa.Text))
outbox = sa.table('outbox', sa.column('id', sa.Integer), sa.column('files', sa.Text))


def _data_dir(conn) -> str | None:
    """The node's data folder, absolute; None when nobody said and no row needs it (an empty database)."""
    given = context.config.attributes.get('data_dir') or context.get_x_argument(as_dictionary=True).get('data_dir')
    if given:
        return os.path.abspath(given)
    rows = conn.scalar(sa.select(sa.func.count()).select_from(instances).where(instances.c.path != '')) \
        + conn.scalar(sa.select(sa.func.count()).select_from(jobs).where(jobs.c.seg_path != '')) \
        + conn.scalar(sa.select(sa.func.count()).select_from(outbox))
    if rows:
        raise RuntimeError("migration 0006 rewrites stored file paths and needs the node's data folder: start the "
                           "node (it passes node.data_dir), or run: alembic -x data_dir=PATH upgrade head")
    return None


def _relative(base: str, path: str) -> str:
    """``path`` relative to ``base`` if it lies inside it (a relative one as the node read it: from its working
    folder), else unchanged."""
    if not path:
        return path
    full = os.path.abspath(path)
    return full[len(base) + 1:].replace(os.sep, '/') if full.startswith(base + os.sep) else path


def _each_column(conn, table, column, fix, *where) -> None:
    """Rows (non-empty, and ``where``) whose value ``fix`` changes, updated in batches (an instances table may
    hold millions)."""
    last = 0
    while True:
        rows = conn.execute(sa.select(table.c.id, column).where(table.c.id > last, column != '', *where)
                            .order_by(table.c.id).limit(5000)).all()
        if not rows:
            return
        changed = [{'rid': rid, 'value': fix(value)} for rid, value in rows if fix(value) != value]
        if changed:
            conn.execute(table.update().where(table.c.id == sa.bindparam('rid'))
                         .values({column.name: sa.bindparam('value')}), changed)
        last = rows[-1][0]


def _files(fix):
    def rewrite(text: str) -> str:
        files = json.loads(text or '[]')
        out = [{**f, 'path': fix(f['path'])} if isinstance(f, dict) and f.get('path') else f for f in files]
        return json.dumps(out) if out != files else text
    return rewrite


def upgrade() -> None:
    conn = op.get_bind()
    base = _data_dir(conn)
    if base is None:
        return
    # the common case in one statement per table: absolute paths under the folder (compared exactly, not with
    # LIKE, which is case-insensitive on SQLite)
    prefix = base + os.sep
    n = len(prefix)
    for table, column in ((instances, instances.c.path), (jobs, jobs.c.seg_path)):
        conn.execute(table.update().where(sa.func.substr(column, 1, n) == prefix)
                     .values({column.name: sa.func.substr(column, n + 1)}))
    # paths the node wrote relative to its working folder (a data_dir given relative, without a config file);
    # the rows made relative just now start with the folder's own sub-folders
    for table, column in ((instances, instances.c.path), (jobs, jobs.c.seg_path)):
        _each_column(conn, table, column, lambda p: _relative(base, p), sa.func.substr(column, 1, 1) != '/',
                     *(sa.func.substr(column, 1, len(sub)) != sub for sub in ('incoming/', 'results/')))
    _each_column(conn, outbox, outbox.c.files, _files(lambda p: _relative(base, p)))


def downgrade() -> None:
    conn = op.get_bind()
    base = _data_dir(conn)
    if base is None:
        return
    absolute = lambda p: p if os.path.isabs(p) else os.path.join(base, *p.split('/'))  # noqa: E731
    _each_column(conn, instances, instances.c.path, absolute)
    _each_column(conn, jobs, jobs.c.seg_path, absolute)
    _each_column(conn, outbox, outbox.c.files, _files(absolute))
