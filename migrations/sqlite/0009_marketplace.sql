-- The two-sided marketplace (issue 5): listing, scheduled price changes, per-install
-- tool choice, reviews, reputation, and the full-text search index.
-- Times are Unix epoch milliseconds; money is integer micros.

-- 0 when the creator unlisted the server: hidden from search and new installs.
ALTER TABLE servers ADD COLUMN listed INTEGER NOT NULL DEFAULT 1 CHECK (listed IN (0, 1));
-- The earliest effective time of a price change not applied yet (NULL: none), so reading
-- a server applies due changes without an extra query in the common case.
ALTER TABLE servers ADD COLUMN next_price_change_at INTEGER;

-- Every price change a creator made, with the time it takes effect. Calls reserve the
-- price that is in effect when they are reserved (the price is copied into `calls`).
CREATE TABLE price_changes (
    id            TEXT PRIMARY KEY,                      -- UUIDv7
    server_id     TEXT NOT NULL REFERENCES servers(id),
    tool          TEXT NOT NULL DEFAULT '',              -- '' = the server's default price
    price_micros  INTEGER CHECK (price_micros IS NULL OR price_micros >= 0), -- NULL removes a tool's override
    effective_at  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    applied_at    INTEGER,
    CHECK (tool <> '' OR price_micros IS NOT NULL)
);
CREATE INDEX price_changes_server ON price_changes(server_id, applied_at, effective_at);

-- The tools an account chose to see of an installed server; no rows: all of them.
CREATE TABLE install_tools (
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    server_id   TEXT NOT NULL REFERENCES servers(id),
    tool        TEXT NOT NULL,
    PRIMARY KEY (account_id, server_id, tool)
);

-- One review per account per server, only after a settled paid call (checked by code).
CREATE TABLE reviews (
    id          TEXT PRIMARY KEY,                        -- UUIDv7
    server_id   TEXT NOT NULL REFERENCES servers(id),
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    rating      INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body        TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    reply       TEXT,                                    -- the creator's one reply
    replied_at  INTEGER,
    UNIQUE (server_id, account_id)
);

-- The last computed reputation of each server (see README "Reputation").
CREATE TABLE server_reputation (
    server_id       TEXT PRIMARY KEY REFERENCES servers(id),
    score           REAL NOT NULL,                       -- 0-100
    uptime          REAL NOT NULL,                       -- 0-1, 30 days of probes
    success_rate    REAL NOT NULL,                       -- 0-1, smoothed
    latency_grade   TEXT NOT NULL CHECK (latency_grade IN ('A', 'B', 'C', 'D', 'F')),
    rating          REAL NOT NULL,                       -- mean stars, 0 without reviews
    rating_bayes    REAL NOT NULL,                       -- Bayesian average, 1-5
    reviews         INTEGER NOT NULL,
    probes          INTEGER NOT NULL,
    calls           INTEGER NOT NULL,
    computed_at     INTEGER NOT NULL
);

-- Full-text search (FTS5, Porter stemming): one row per server, one per visible tool.
CREATE VIRTUAL TABLE server_search USING fts5(
    server_id UNINDEXED, name, description, categories, tools,
    tokenize = 'porter unicode61'
);
CREATE VIRTUAL TABLE tool_search USING fts5(
    server_id UNINDEXED, tool UNINDEXED, name, description,
    tokenize = 'porter unicode61'
);
