-- Tables shared by the reliability layer (issue 4) and the marketplace (issue 5):
-- the probe history that uptime, grades and reputation are computed from, and the
-- transactional alert outbox that webhooks and e-mail are delivered from.
-- Times are Unix epoch milliseconds.

-- One run of the probe of DESIGN.md "Health and trust" against one endpoint.
CREATE TABLE probe_results (
    id                 TEXT PRIMARY KEY,                     -- UUIDv7
    server_id          TEXT NOT NULL REFERENCES servers(id),
    endpoint_position  INTEGER,                                 -- server_endpoints.position, NULL when not endpoint-specific
    kind               TEXT NOT NULL CHECK (kind IN ('scheduled', 'registration', 'manual')),
    started_at         INTEGER NOT NULL,
    duration_ms        INTEGER NOT NULL CHECK (duration_ms >= 0),
    latency_ms         INTEGER,                                 -- initialize + tools/list round trip; NULL when unreachable
    grade              TEXT NOT NULL CHECK (grade IN ('A', 'B', 'C', 'D', 'F')),
    ok                 INTEGER NOT NULL CHECK (ok IN (0, 1)),   -- 1 when every check passed
    checks             TEXT NOT NULL                         -- JSON array of {"name", "ok", "detail", "duration_ms"}
);
CREATE INDEX probe_results_server ON probe_results(server_id, started_at);

-- Alerts waiting for (or done with) delivery. A row is written in the same transaction
-- as the change it reports, so no alert is lost across a crash; the id is the event id
-- a receiver deduplicates on.
CREATE TABLE alert_outbox (
    id               TEXT PRIMARY KEY,                       -- UUIDv7, the event id
    account_id       TEXT NOT NULL REFERENCES accounts(id),  -- who is told
    kind             TEXT NOT NULL,                          -- e.g. server.status_changed
    payload          TEXT NOT NULL,                          -- the JSON event
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    delivered_at     INTEGER,
    last_error       TEXT
);
CREATE INDEX alert_outbox_due ON alert_outbox(delivered_at, next_attempt_at);
