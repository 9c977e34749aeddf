-- A paginated JSON API into a table every night at 03:00 New York time, incremental on
-- updated_at, within a fleet-wide budget of 1,000 requests per hour.
INSERT INTO syncworker.integrations (name, kind, config, cron, timezone)
VALUES ('example-crm-contacts', 'http', '{
  "url": "https://api.example.com/v1/contacts",
  "auth": {"type": "bearer", "token": {"env": "CRM_TOKEN"}},
  "records_path": "data",
  "pagination": {"type": "cursor", "cursor_path": "meta.next_cursor", "param": "cursor"},
  "incremental": {"cursor_field": "updated_at", "param": "updated_since", "lookback": 3600},
  "rate_limit": {"requests": 1000, "per_seconds": 3600},
  "mapping": {"id": "id", "email": "email", "updated_at": "updated_at"},
  "destination": {"table": "public.crm_contacts", "key": ["id"], "create_table": true,
                  "columns": {"id": "bigint", "email": "text", "updated_at": "timestamptz"}}
}', '0 3 * * *', 'America/New_York');
