-- syncworker.cron_error(expr): NULL when `expr` is a valid cron expression, else why not.
-- The rules and messages match worker/cron.py's parse(); a test checks that they agree.
CREATE OR REPLACE FUNCTION syncworker.cron_error(expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  names constant text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
  lows constant int[] := ARRAY[0, 0, 1, 1, 0];
  highs constant int[] := ARRAY[59, 23, 31, 12, 7];
  months constant text[] := ARRAY['jan','feb','mar','apr','may','jun','jul','aug','sep','oct','nov','dec'];
  days constant text[] := ARRAY['sun','mon','tue','wed','thu','fri','sat'];
  body text := btrim(expr);
  fields text[];
  raw text;
  item text;
  base text;
  step_text text;
  token text;
  tokens text[];
  bounds int[];
  value int;
  i int;
BEGIN
  body := CASE lower(body)
    WHEN '@yearly' THEN '0 0 1 1 *' WHEN '@annually' THEN '0 0 1 1 *'
    WHEN '@monthly' THEN '0 0 1 * *' WHEN '@weekly' THEN '0 0 * * 0'
    WHEN '@daily' THEN '0 0 * * *' WHEN '@midnight' THEN '0 0 * * *'
    WHEN '@hourly' THEN '0 * * * *' ELSE body END;
  fields := CASE WHEN body = '' THEN ARRAY[]::text[] ELSE regexp_split_to_array(body, '\s+') END;
  IF coalesce(array_length(fields, 1), 0) <> 5 THEN
    RETURN format('cron "%s": expected 5 fields (minute hour day-of-month month day-of-week), got %s',
                  expr, coalesce(array_length(fields, 1), 0));
  END IF;
  FOR i IN 1..5 LOOP
    raw := fields[i];
    FOREACH item IN ARRAY string_to_array(raw, ',') LOOP
      IF item = '' THEN
        RETURN format('cron "%s": %s field "%s" has an empty list item', expr, names[i], raw);
      END IF;
      base := split_part(item, '/', 1);
      IF position('/' IN item) > 0 THEN
        step_text := substr(item, position('/' IN item) + 1);
        IF step_text !~ '^[0-9]+$' OR step_text::numeric = 0 THEN
          RETURN format('cron "%s": %s field "%s" has step ''%s'', expected a positive number',
                        expr, names[i], raw, step_text);
        END IF;
      END IF;
      CONTINUE WHEN base = '*';
      tokens := CASE WHEN position('-' IN base) > 0
                     THEN ARRAY[split_part(base, '-', 1), substr(base, position('-' IN base) + 1)]
                     ELSE ARRAY[base] END;
      bounds := ARRAY[]::int[];
      FOREACH token IN ARRAY tokens LOOP
        IF token ~ '^[0-9]+$' THEN
          value := CASE WHEN length(token) > 6 THEN 1000000 ELSE token::int END;
        ELSIF i = 4 AND lower(token) = ANY (months) THEN
          value := array_position(months, lower(token));
        ELSIF i = 5 AND lower(token) = ANY (days) THEN
          value := array_position(days, lower(token)) - 1;
        ELSE
          RETURN format('cron "%s": %s field "%s" has ''%s'', expected a number%s',
                        expr, names[i], raw, token, CASE WHEN i >= 4 THEN ' or a name' ELSE '' END);
        END IF;
        IF value < lows[i] OR value > highs[i] THEN
          RETURN format('cron "%s": %s field "%s" is out of range %s-%s', expr, names[i], raw, lows[i], highs[i]);
        END IF;
        bounds := bounds || value;
      END LOOP;
      IF array_length(bounds, 1) = 2 AND bounds[1] > bounds[2] THEN
        RETURN format('cron "%s": %s field "%s" has a reversed range %s', expr, names[i], raw, base);
      END IF;
    END LOOP;
  END LOOP;
  RETURN NULL;
END
$$;
