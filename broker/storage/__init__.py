"""Storage: SQLAlchemy Core tables, the async engine, the repository and Alembic migrations."""
