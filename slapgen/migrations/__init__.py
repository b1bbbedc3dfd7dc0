"""Alembic migrations of slapgen's database (see `slapgen.database`): one branch per store."""
