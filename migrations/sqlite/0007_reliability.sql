-- The reliability layer (issue 4): the status machine's counters per server and the
-- record of every status transition. Times are Unix epoch milliseconds.

-- Consecutive probe outcomes per server (see src/upstream/health.rs for the rules).
CREATE TABLE server_health (
    server_id          TEXT PRIMARY KEY REFERENCES servers(id),
    probe_passes       INTEGER NOT NULL DEFAULT 0 CHECK (probe_passes >= 0),     -- consecutive passing probes
    probe_reachable    INTEGER NOT NULL DEFAULT 0 CHECK (probe_reachable >= 0),  -- consecutive probes where some endpoint answered
    probe_failures     INTEGER NOT NULL DEFAULT 0 CHECK (probe_failures >= 0),   -- consecutive probes where no endpoint answered
    updated_at         INTEGER NOT NULL
);

-- Every move of a server between statuses, with who moved it and why.
CREATE TABLE server_status_events (
    id           TEXT PRIMARY KEY,                         -- UUIDv7
    server_id    TEXT NOT NULL REFERENCES servers(id),
    from_status  TEXT NOT NULL,
    to_status    TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('probe', 'calls', 'admin')),
    reason       TEXT NOT NULL,
    at           INTEGER NOT NULL
);
CREATE INDEX server_status_events_server ON server_status_events(server_id, at);
