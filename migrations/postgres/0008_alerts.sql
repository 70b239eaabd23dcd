-- Alert delivery (issue 4 item 7): where each account's alerts go, the delivery state
-- of each outbox row per channel, the lease that lets several replicas share the
-- outbox, and the weekly digests already enqueued. Times are Unix epoch milliseconds.

-- One row per account that configured a channel. The webhook's HMAC signing secret is
-- stored encrypted by the vault (AES-256-GCM, bound to "alert_webhook:{account_id}").
CREATE TABLE alert_channels (
    account_id      TEXT PRIMARY KEY REFERENCES accounts(id),
    webhook_url     TEXT,
    webhook_secret  TEXT,                 -- vault ciphertext; NULL exactly when webhook_url is
    email           TEXT,
    updated_at      BIGINT NOT NULL,
    CHECK ((webhook_url IS NULL) = (webhook_secret IS NULL))
);

-- A worker claims a row by setting lease_owner/lease_until; another replica takes it
-- over only after the lease expired (a crashed worker). Each channel is marked done on
-- its own, so a retry never sends again what one channel already accepted. dead_at:
-- given up after the last attempt.
ALTER TABLE alert_outbox ADD COLUMN lease_owner TEXT;
ALTER TABLE alert_outbox ADD COLUMN lease_until BIGINT;
ALTER TABLE alert_outbox ADD COLUMN webhook_done_at BIGINT;
ALTER TABLE alert_outbox ADD COLUMN email_done_at BIGINT;
ALTER TABLE alert_outbox ADD COLUMN dead_at BIGINT;
CREATE INDEX alert_outbox_account ON alert_outbox(account_id, created_at);

-- One weekly digest per creator per ISO week ("2026-W48"): the primary key makes
-- enqueueing idempotent across replicas and restarts.
CREATE TABLE weekly_digests (
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    week        TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (account_id, week)
);
