-- Flush leaderboards (three sorted sets joined by member) into a table every hour,
-- inserting, updating and deleting rows to match.
INSERT INTO syncworker.integrations (name, kind, config, cron)
VALUES ('example-leaderboards', 'redis', '{
  "url": {"env": "REDIS_URL"},
  "source": {"type": "zset",
             "columns": {"daily": "lb:daily", "weekly": "lb:weekly", "monthly": "lb:monthly"}},
  "key_column": "player_id",
  "destination": {"table": "public.leaderboard", "key": ["player_id"], "create_table": true}
}', '0 * * * *');
