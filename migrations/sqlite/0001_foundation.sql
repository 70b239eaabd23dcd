-- Foundation schema: accounts, keys, catalog, installs, ledger, calls, signing keys.
-- Times are Unix epoch milliseconds (INTEGER); money is integer micros (1e-6 USD).

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY,
    account_id          TEXT NOT NULL REFERENCES accounts(id),
    prefix              TEXT NOT NULL,
    hash                TEXT NOT NULL UNIQUE,
    scopes              TEXT NOT NULL,
    allow_tools         TEXT,
    spend_limit_micros  INTEGER CHECK (spend_limit_micros IS NULL OR spend_limit_micros >= 0),
    spend_limit_period  TEXT CHECK (spend_limit_period IS NULL OR spend_limit_period IN ('day', 'month')),
    expires_at          INTEGER,
    revoked_at          INTEGER,
    created_at          INTEGER NOT NULL
);
CREATE INDEX api_keys_account ON api_keys(account_id);
CREATE INDEX api_keys_prefix ON api_keys(prefix);

CREATE TABLE servers (
    id                TEXT PRIMARY KEY,
    slug              TEXT NOT NULL UNIQUE,
    name              TEXT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    categories        TEXT NOT NULL DEFAULT '',
    owner_account_id  TEXT NOT NULL REFERENCES accounts(id),
    price_micros      INTEGER NOT NULL CHECK (price_micros >= 0),
    status            TEXT NOT NULL CHECK (status IN ('pending_review', 'active', 'degraded', 'inactive', 'recovered', 'suspended')),
    secret            TEXT NOT NULL,
    timeout_ms        INTEGER NOT NULL CHECK (timeout_ms > 0),
    tools_fetched_at  INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE TABLE server_endpoints (
    server_id  TEXT NOT NULL REFERENCES servers(id),
    position   INTEGER NOT NULL,
    url        TEXT NOT NULL,
    PRIMARY KEY (server_id, position)
);

CREATE TABLE tool_prices (
    server_id     TEXT NOT NULL REFERENCES servers(id),
    tool          TEXT NOT NULL,
    price_micros  INTEGER NOT NULL CHECK (price_micros >= 0),
    PRIMARY KEY (server_id, tool)
);

CREATE TABLE upstream_tools (
    server_id        TEXT NOT NULL REFERENCES servers(id),
    name             TEXT NOT NULL,
    namespaced_name  TEXT NOT NULL UNIQUE,
    definition       TEXT NOT NULL,
    position         INTEGER NOT NULL,
    PRIMARY KEY (server_id, name)
);

CREATE TABLE installs (
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    server_id   TEXT NOT NULL REFERENCES servers(id),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, server_id)
);

-- Ledger: balance = sum of the account's entries (credits positive, debits negative).
CREATE TABLE ledger_accounts (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('wallet', 'holds', 'earnings', 'revenue', 'external')),
    balance     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    CHECK (kind <> 'wallet' OR balance >= 0),
    CHECK (kind <> 'holds' OR balance >= 0)
);

CREATE TABLE ledger_transfers (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('topup', 'reserve', 'settle', 'refund', 'payout', 'adjustment')),
    call_id     TEXT,
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    memo        TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
-- A call has at most one transfer of each kind: never reserved, settled or refunded twice.
CREATE UNIQUE INDEX ledger_transfers_call_kind ON ledger_transfers(call_id, kind) WHERE call_id IS NOT NULL;

CREATE TABLE ledger_entries (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    transfer_id        TEXT NOT NULL REFERENCES ledger_transfers(id),
    ledger_account_id  TEXT NOT NULL REFERENCES ledger_accounts(id),
    amount             INTEGER NOT NULL
);
CREATE INDEX ledger_entries_transfer ON ledger_entries(transfer_id);
CREATE INDEX ledger_entries_account ON ledger_entries(ledger_account_id);

CREATE TABLE calls (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    key_id           TEXT NOT NULL,
    server_id        TEXT NOT NULL REFERENCES servers(id),
    tool             TEXT NOT NULL,
    price_micros     INTEGER NOT NULL CHECK (price_micros >= 0),
    creator_micros   INTEGER NOT NULL CHECK (creator_micros >= 0),
    fee_micros       INTEGER NOT NULL CHECK (fee_micros >= 0),
    status           TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'refunded')),
    error_kind       TEXT,
    hold_expires_at  INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    latency_ms       INTEGER,
    CHECK (creator_micros + fee_micros = price_micros)
);
CREATE INDEX calls_status ON calls(status, hold_expires_at);
CREATE INDEX calls_account ON calls(account_id, created_at);

CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    seed        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Marketplace-wide settings (e.g. the salt of upstream pseudonyms).
CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- The ledger accounts that exist once per marketplace.
INSERT INTO ledger_accounts (id, kind, balance, created_at) VALUES
    ('holds', 'holds', 0, 0),
    ('platform:revenue', 'revenue', 0, 0),
    ('external:topups', 'external', 0, 0),
    ('external:payouts', 'external', 0, 0);
