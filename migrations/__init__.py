"""The relay's Alembic history (packaged as `app.migrations`)."""
