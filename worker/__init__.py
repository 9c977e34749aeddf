"""syncworker: a Postgres-native daemon that runs data sync jobs."""

__version__ = "0.1.0"
