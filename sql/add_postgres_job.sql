-- Mirror a table from another database every minute, incrementally on updated_at.
-- For real time, also run `syncworker install-trigger example-orders-mirror`.
INSERT INTO syncworker.integrations (name, kind, config, interval_seconds)
VALUES ('example-orders-mirror', 'postgres', '{
  "source": {"dsn": {"env": "SHOP_DSN"}, "table": "public.orders", "key": ["id"],
             "updated_at": "updated_at"},
  "destination": {"table": "public.orders_mirror", "key": ["id"], "create_table": true},
  "deletes": "hard"
}', 60);
