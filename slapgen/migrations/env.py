"""Alembic's environment: slapgen always hands it an open connection (`slapgen.database.migrate`), inside
the transaction that holds the migration lock; there is no alembic.ini and no offline (SQL script) mode."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("slapgen's migrations run through slapgen.database.migrate, which passes a connection")
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
