-- Trust layer (issue 3): spend limits per day and per month, tool pinning, upstream
-- credentials encrypted at rest, per-subject trust policies, the audit log.
-- Times are Unix epoch milliseconds; money is integer micros.

-- A key may carry a daily and a monthly spend limit at once. These columns supersede
-- api_keys.spend_limit_micros/spend_limit_period, which are copied here and no longer
-- written or read.
ALTER TABLE api_keys ADD COLUMN daily_limit_micros INTEGER CHECK (daily_limit_micros IS NULL OR daily_limit_micros >= 0);
ALTER TABLE api_keys ADD COLUMN monthly_limit_micros INTEGER CHECK (monthly_limit_micros IS NULL OR monthly_limit_micros >= 0);
UPDATE api_keys SET daily_limit_micros = spend_limit_micros WHERE spend_limit_period = 'day';
UPDATE api_keys SET monthly_limit_micros = spend_limit_micros WHERE spend_limit_period = 'month';
-- The spend-limit sum of Ledger::reserve reads a key's calls of the period.
CREATE INDEX calls_key ON calls(key_id, created_at);

-- Tool pinning: the SHA-256 of each cached definition's reviewed fields, the hashes an
-- admin approved, and every change the marketplace detected.
ALTER TABLE upstream_tools ADD COLUMN hash TEXT NOT NULL DEFAULT '';
CREATE TABLE tool_pins (
    server_id    TEXT NOT NULL REFERENCES servers(id),
    tool         TEXT NOT NULL,
    hash         TEXT NOT NULL,
    approved_at  INTEGER NOT NULL,
    approved_by  TEXT NOT NULL,
    PRIMARY KEY (server_id, tool)
);
CREATE TABLE tool_changes (
    id           TEXT PRIMARY KEY,
    server_id    TEXT NOT NULL REFERENCES servers(id),
    tool         TEXT NOT NULL,
    old_hash     TEXT,
    new_hash     TEXT NOT NULL,
    detected_at  INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'reverted')),
    resolved_at  INTEGER,
    alerted_at   INTEGER
);
-- At most one pending change per tool: a further change updates it.
CREATE UNIQUE INDEX tool_changes_one_pending ON tool_changes(server_id, tool) WHERE state = 'pending';
CREATE INDEX tool_changes_unalerted ON tool_changes(state, alerted_at);

-- Upstream credentials a creator set: AES-256-GCM ciphertext (nonce ‖ ciphertext ‖ tag,
-- base64), bound to (server, header) by its associated data.
CREATE TABLE server_credentials (
    server_id   TEXT NOT NULL REFERENCES servers(id),
    header      TEXT NOT NULL,
    ciphertext  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (server_id, header)
);

-- Trust policy overrides of one server, account or key; NULL inherits the default.
-- Rates are "N/sec", "N/min", "N/hour" or "off"; redact is a JSON array of RFC 9535
-- JSONPath expressions.
CREATE TABLE trust_policies (
    subject_kind            TEXT NOT NULL CHECK (subject_kind IN ('server', 'account', 'key')),
    subject_id              TEXT NOT NULL,
    per_account_per_server  TEXT,
    per_account             TEXT,
    per_key                 TEXT,
    max_concurrency         INTEGER CHECK (max_concurrency IS NULL OR max_concurrency > 0),
    scan_mode               TEXT CHECK (scan_mode IS NULL OR scan_mode IN ('off', 'flag', 'block')),
    redact                  TEXT,
    updated_at              INTEGER NOT NULL,
    PRIMARY KEY (subject_kind, subject_id)
);

-- Who did what, when: key creation and revocation, approvals, suspensions, credential
-- changes, secret rotations, policy changes, blocked calls.
CREATE TABLE audit_log (
    id       TEXT PRIMARY KEY,
    at       INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log(at);
CREATE INDEX audit_log_action ON audit_log(action, at);
