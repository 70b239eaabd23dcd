-- The two-sided marketplace (issue 5): listing, scheduled price changes, per-install
-- tool choice, reviews, reputation, and the full-text search index.
-- Times are Unix epoch milliseconds; money is integer micros.

-- 0 when the creator unlisted the server: hidden from search and new installs.
ALTER TABLE servers ADD COLUMN listed BIGINT NOT NULL DEFAULT 1 CHECK (listed IN (0, 1));
-- The earliest effective time of a price change not applied yet (NULL: none), so reading
-- a server applies due changes without an extra query in the common case.
ALTER TABLE servers ADD COLUMN next_price_change_at BIGINT;

-- Every price change a creator made, with the time it takes effect. Calls reserve the
-- price that is in effect when they are reserved (the price is copied into `calls`).
CREATE TABLE price_changes (
    id            TEXT PRIMARY KEY,
    server_id     TEXT NOT NULL REFERENCES servers(id),
    tool          TEXT NOT NULL DEFAULT '',
    price_micros  BIGINT CHECK (price_micros IS NULL OR price_micros >= 0),
    effective_at  BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    applied_at    BIGINT,
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
    id          TEXT PRIMARY KEY,
    server_id   TEXT NOT NULL REFERENCES servers(id),
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    rating      BIGINT NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body        TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    reply       TEXT,
    replied_at  BIGINT,
    UNIQUE (server_id, account_id)
);

-- The last computed reputation of each server (see README "Reputation").
CREATE TABLE server_reputation (
    server_id       TEXT PRIMARY KEY REFERENCES servers(id),
    score           DOUBLE PRECISION NOT NULL,
    uptime          DOUBLE PRECISION NOT NULL,
    success_rate    DOUBLE PRECISION NOT NULL,
    latency_grade   TEXT NOT NULL CHECK (latency_grade IN ('A', 'B', 'C', 'D', 'F')),
    rating          DOUBLE PRECISION NOT NULL,  -- mean stars, 0 without reviews
    rating_bayes    DOUBLE PRECISION NOT NULL,
    reviews         BIGINT NOT NULL,
    probes          BIGINT NOT NULL,
    calls           BIGINT NOT NULL,
    computed_at     BIGINT NOT NULL
);

-- Full-text search (english text search configuration): one row per server (name
-- weighted A, categories and description B, tools C), one per visible tool.
CREATE TABLE server_search (
    server_id  TEXT PRIMARY KEY REFERENCES servers(id),
    document   tsvector NOT NULL
);
CREATE INDEX server_search_document ON server_search USING GIN (document);
CREATE TABLE tool_search (
    server_id  TEXT NOT NULL REFERENCES servers(id),
    tool       TEXT NOT NULL,
    document   tsvector NOT NULL,
    PRIMARY KEY (server_id, tool)
);
CREATE INDEX tool_search_document ON tool_search USING GIN (document);
