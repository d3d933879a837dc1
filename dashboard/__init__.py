"""edgeopt dashboard: Flask + SQLAlchemy fleet dashboard."""
