-- What each API key spent per limited period (issue 7): the spend-limit check of a
-- reservation reads one row instead of summing the key's calls since the period start
-- under the ledger's write lock (18 ms per batch once a key made 100,000 calls in the
-- period). A priced reservation adds its price to its key's counter of each period the
-- key limits (the UTC day, the UTC month it was made in); its refund takes the price
-- back from the counters of its call's day and month, where they exist. A key's limits
-- are fixed when it is created, so a counter holds every non-refunded price of its key
-- in its period, and a key without limits costs its calls no counter write. `ledger
-- verify` checks each counter against the calls, and that every limited key's period
-- with spending has one.
--   period:       'day' or 'month'
--   period_start: the period's first instant, epoch ms (UTC)
CREATE TABLE key_spend_counters (
    key_id        TEXT NOT NULL,
    period        TEXT NOT NULL CHECK (period IN ('day', 'month')),
    period_start  INTEGER NOT NULL,
    spent_micros  INTEGER NOT NULL CHECK (spent_micros >= 0),
    PRIMARY KEY (key_id, period, period_start)
) WITHOUT ROWID;
-- Calls made before this migration count in the periods their keys limit.
INSERT INTO key_spend_counters (key_id, period, period_start, spent_micros)
    SELECT key_id, 'day', created_at - created_at % 86400000, SUM(price_micros)
    FROM calls WHERE status <> 'refunded' AND price_micros > 0
        AND key_id IN (SELECT id FROM api_keys WHERE daily_limit_micros IS NOT NULL)
    GROUP BY key_id, created_at - created_at % 86400000;
INSERT INTO key_spend_counters (key_id, period, period_start, spent_micros)
    SELECT key_id, 'month', CAST(strftime('%s', created_at / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000,
        SUM(price_micros)
    FROM calls WHERE status <> 'refunded' AND price_micros > 0
        AND key_id IN (SELECT id FROM api_keys WHERE monthly_limit_micros IS NOT NULL)
    GROUP BY key_id, strftime('%s', created_at / 1000, 'unixepoch', 'start of month');
