-- Billing engine (issue 6): plans and quotas, the usage log, invoices, payouts, Stripe
-- top-ups, low-balance alerts. Times are Unix epoch milliseconds (BIGINT); money is integer micros.

-- 1. New transfer kinds (subscription fees, included credits, reversals of refunded or
--    disputed payments).
ALTER TABLE ledger_transfers DROP CONSTRAINT ledger_transfers_kind_check;
ALTER TABLE ledger_transfers ADD CONSTRAINT ledger_transfers_kind_check
    CHECK (kind IN ('topup', 'reserve', 'settle', 'refund', 'payout', 'adjustment',
                    'subscription', 'included_credits', 'reversal'));
CREATE INDEX ledger_transfers_created ON ledger_transfers(created_at);

-- Refuses a statement on a table whose rows must never change (TG_ARGV[0] says why).
CREATE FUNCTION mkt_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

-- Transfers and entries are immutable (TigerBeetle's rule): corrections are new transfers.
CREATE TRIGGER ledger_transfers_immutable BEFORE UPDATE OR DELETE ON ledger_transfers
    FOR EACH ROW EXECUTE FUNCTION mkt_refuse_change('ledger transfers are immutable');
CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION mkt_refuse_change('ledger entries are immutable');

-- 2. The platform's contra-revenue accounts: credits it gives with plans, and what it
--    loses when a refunded or disputed payment was already spent.
INSERT INTO ledger_accounts (id, kind, balance, created_at) VALUES
    ('platform:included_credits', 'revenue', 0, 0),
    ('platform:losses', 'revenue', 0, 0)
ON CONFLICT (id) DO NOTHING;

-- 3. Low-balance alerts live on the wallet row, so the reserve's guarded debit reads the
--    threshold without another query. `low_balance_alerted` is 1 from the alert until a
--    credit from outside (top-up, included credits) lifts the balance back over it.
ALTER TABLE ledger_accounts ADD COLUMN low_balance_micros BIGINT CHECK (low_balance_micros IS NULL OR low_balance_micros >= 0);
ALTER TABLE ledger_accounts ADD COLUMN low_balance_alerted BIGINT NOT NULL DEFAULT 0 CHECK (low_balance_alerted IN (0, 1));

CREATE TABLE balance_alerts (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    kind              TEXT NOT NULL CHECK (kind IN ('low_balance')),
    threshold_micros  BIGINT NOT NULL,
    balance_micros    BIGINT NOT NULL,
    call_id           TEXT,
    created_at        BIGINT NOT NULL,
    handed_off_at     BIGINT
);
CREATE INDEX balance_alerts_account ON balance_alerts(account_id, created_at);
CREATE INDEX balance_alerts_pending ON balance_alerts(handed_off_at, created_at);

-- 4. The usage log is the calls table: written at reserve, completed once by settle or
--    refund, then immutable (triggers below). Bytes in and out of each call.
ALTER TABLE calls ADD COLUMN request_bytes BIGINT NOT NULL DEFAULT 0 CHECK (request_bytes >= 0);
ALTER TABLE calls ADD COLUMN response_bytes BIGINT NOT NULL DEFAULT 0 CHECK (response_bytes >= 0);
CREATE INDEX calls_account_id ON calls(account_id, id);
CREATE INDEX calls_account_finished ON calls(account_id, finished_at);
-- calls_key (key_id, created_at), which the spend limits read, comes with 0002.

CREATE FUNCTION mkt_calls_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'the usage log is append-only: calls are never deleted'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status <> 'reserved'
       OR NEW.id IS DISTINCT FROM OLD.id OR NEW.account_id IS DISTINCT FROM OLD.account_id
       OR NEW.key_id IS DISTINCT FROM OLD.key_id OR NEW.server_id IS DISTINCT FROM OLD.server_id
       OR NEW.tool IS DISTINCT FROM OLD.tool OR NEW.price_micros IS DISTINCT FROM OLD.price_micros
       OR NEW.creator_micros IS DISTINCT FROM OLD.creator_micros
       OR NEW.fee_micros IS DISTINCT FROM OLD.fee_micros OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.request_bytes IS DISTINCT FROM OLD.request_bytes THEN
        RAISE EXCEPTION 'the usage log is append-only: a finished call cannot change'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER calls_append_only BEFORE UPDATE OR DELETE ON calls
    FOR EACH ROW EXECUTE FUNCTION mkt_calls_append_only();

-- Calls (reserved or settled; refunded ones are taken back) and their prices per account
-- and UTC month ('YYYY-MM'): the monthly quota is a guarded increment of `calls`.
CREATE TABLE usage_counters (
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    month         TEXT NOT NULL,
    calls         BIGINT NOT NULL CHECK (calls >= 0),
    spent_micros  BIGINT NOT NULL CHECK (spent_micros >= 0),
    PRIMARY KEY (account_id, month)
);
-- Calls made before this migration count in their months.
INSERT INTO usage_counters (account_id, month, calls, spent_micros)
    SELECT account_id, to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM'), COUNT(*), SUM(price_micros)
    FROM calls WHERE status <> 'refunded'
    GROUP BY account_id, to_char(to_timestamp(created_at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM');

-- 5. Plans: an account's plan history. The plan in effect at time t is the row with the
--    latest effective_at <= t (ties: the later id); none means the default plan.
CREATE TABLE account_plans (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    plan_id       TEXT NOT NULL,
    effective_at  BIGINT NOT NULL,
    reason        TEXT NOT NULL CHECK (reason IN ('change', 'lapsed')),
    created_at    BIGINT NOT NULL
);
CREATE INDEX account_plans_account ON account_plans(account_id, effective_at);

-- One booked subscription period per (plan row, month); account_plan_id '' is the default
-- plan of an account without a plan row.
CREATE TABLE subscription_periods (
    id                     TEXT PRIMARY KEY,
    account_id             TEXT NOT NULL REFERENCES accounts(id),
    account_plan_id        TEXT NOT NULL,
    month                  TEXT NOT NULL,
    plan_id                TEXT NOT NULL,
    plan_name              TEXT NOT NULL,
    starts_at              BIGINT NOT NULL,
    fee_micros             BIGINT NOT NULL CHECK (fee_micros >= 0),
    credits_micros         BIGINT NOT NULL CHECK (credits_micros >= 0),
    fee_transfer_id        TEXT REFERENCES ledger_transfers(id),
    credits_transfer_id    TEXT REFERENCES ledger_transfers(id),
    created_at             BIGINT NOT NULL,
    UNIQUE (account_id, account_plan_id, month),
    CHECK ((fee_micros = 0) = (fee_transfer_id IS NULL)),
    CHECK ((credits_micros = 0) = (credits_transfer_id IS NULL))
);
CREATE INDEX subscription_periods_month ON subscription_periods(month, account_id);

-- 6. Closed months and their invoices, stored once and never changed.
CREATE TABLE billing_periods (
    month      TEXT PRIMARY KEY,
    closed_at  BIGINT NOT NULL,
    invoices   BIGINT NOT NULL
);
CREATE TABLE invoices (
    account_id              TEXT NOT NULL REFERENCES accounts(id),
    month                   TEXT NOT NULL REFERENCES billing_periods(month),
    number                  TEXT NOT NULL UNIQUE,
    subscription_micros     BIGINT NOT NULL,
    usage_micros            BIGINT NOT NULL,
    total_micros            BIGINT NOT NULL,
    opening_balance_micros  BIGINT NOT NULL,
    closing_balance_micros  BIGINT NOT NULL,
    json                    TEXT NOT NULL,
    csv                     TEXT NOT NULL,
    html                    TEXT NOT NULL,
    sha256                  TEXT NOT NULL,
    created_at              BIGINT NOT NULL,
    PRIMARY KEY (account_id, month)
);
CREATE TRIGGER billing_periods_immutable BEFORE UPDATE OR DELETE ON billing_periods
    FOR EACH ROW EXECUTE FUNCTION mkt_refuse_change('a closed month stays closed');
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION mkt_refuse_change('invoices are immutable');

-- 7. Payouts: where each creator is paid, and one row per (creator, month): 'paid' books
--    a payout transfer consuming the earnings settled in [earned_from, earned_to) plus the
--    sub-cent remainder carried in; 'held' pays nothing and carries everything forward.
CREATE TABLE payees (
    account_id   TEXT PRIMARY KEY REFERENCES accounts(id),
    method       TEXT NOT NULL CHECK (method IN ('paypal', 'stripe')),
    destination  TEXT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE TABLE payouts (
    id                    TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL REFERENCES accounts(id),
    month                 TEXT NOT NULL REFERENCES billing_periods(month),
    status                TEXT NOT NULL CHECK (status IN ('paid', 'held')),
    reason                TEXT NOT NULL DEFAULT '',
    amount_micros         BIGINT NOT NULL CHECK (amount_micros >= 0 AND amount_micros % 10000 = 0),
    earned_micros         BIGINT NOT NULL CHECK (earned_micros >= 0),
    carried_in_micros     BIGINT NOT NULL CHECK (carried_in_micros >= 0),
    carried_out_micros    BIGINT NOT NULL CHECK (carried_out_micros >= 0),
    earned_from           BIGINT NOT NULL,
    earned_to             BIGINT NOT NULL,
    method                TEXT,
    destination           TEXT,
    reference             TEXT NOT NULL,
    transfer_id           TEXT REFERENCES ledger_transfers(id),
    created_at            BIGINT NOT NULL,
    UNIQUE (account_id, month),
    CHECK ((status = 'paid') = (transfer_id IS NOT NULL)),
    CHECK (status = 'held' OR amount_micros > 0),
    CHECK (status = 'paid' OR amount_micros = 0)
);
CREATE TRIGGER payouts_immutable BEFORE UPDATE OR DELETE ON payouts
    FOR EACH ROW EXECUTE FUNCTION mkt_refuse_change('payouts are immutable');

-- 8. Stripe: every event id is handled once; every payment is credited once and reversed
--    at most up to its amount.
CREATE TABLE stripe_events (
    id           TEXT PRIMARY KEY,
    type         TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    received_at  BIGINT NOT NULL
);
CREATE TABLE stripe_payments (
    payment_key         TEXT PRIMARY KEY,
    session_id          TEXT UNIQUE,
    account_id          TEXT REFERENCES accounts(id),
    amount_micros       BIGINT NOT NULL DEFAULT 0 CHECK (amount_micros >= 0),
    credit_transfer_id  TEXT UNIQUE REFERENCES ledger_transfers(id),
    refunded_micros     BIGINT NOT NULL DEFAULT 0 CHECK (refunded_micros >= 0),
    disputed_micros     BIGINT NOT NULL DEFAULT 0 CHECK (disputed_micros >= 0),
    reversed_micros     BIGINT NOT NULL DEFAULT 0 CHECK (reversed_micros >= 0),
    created_at          BIGINT NOT NULL,
    CHECK (reversed_micros <= amount_micros)
);
CREATE TABLE stripe_disputes (
    id           TEXT PRIMARY KEY,
    payment_key  TEXT NOT NULL,
    amount_micros BIGINT NOT NULL CHECK (amount_micros >= 0),
    created_at   BIGINT NOT NULL
);
CREATE TABLE stripe_reversals (
    transfer_id   TEXT PRIMARY KEY REFERENCES ledger_transfers(id),
    payment_key   TEXT NOT NULL REFERENCES stripe_payments(payment_key),
    amount_micros BIGINT NOT NULL CHECK (amount_micros > 0),
    loss_micros   BIGINT NOT NULL CHECK (loss_micros >= 0),
    created_at    BIGINT NOT NULL
);
