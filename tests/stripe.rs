//! Paid top-ups: Stripe webhook deliveries over real HTTP to a running marketplace,
//! with payloads shaped like Stripe's documented event examples and signed here with
//! HMAC-SHA256 as Stripe signs them. Correct, wrong, replayed, stale and duplicate
//! deliveries; refunds and disputes; on SQLite and PostgreSQL.

mod common;

use common::{Backend, Market, TestDb, World, args, backends};
use hmac::{Hmac, Mac};
use mcp_marketplace::billing::stripe::WebhookSecret;
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::Row;

const SECRET: &str = "whsec_3f9a1c6e0b7d4e2a8c5f1b9d7e3a6c0f";

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The hex HMAC-SHA256 of `t.payload` under `secret`, as in a `v1=` signature.
fn sign(secret: &str, t: i64, payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{payload}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn signed(payload: &str) -> String {
    let t = now_secs();
    format!("t={t},v1={}", sign(SECRET, t, payload))
}

async fn start(backend: Backend) -> Market {
    Market::start_with(TestDb::new(backend).await, |c| {
        c.billing.stripe_webhook_secret = Some(WebhookSecret::new(SECRET));
    })
    .await
}

async fn deliver(base: &str, payload: &str, signature: Option<String>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(payload.to_owned());
    if let Some(s) = signature {
        req = req.header("Stripe-Signature", s);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A Checkout Session of a `checkout.session.completed` event.
struct Session<'a> {
    event: &'a str,
    id: &'a str,
    payment_intent: &'a str,
    reference: Value,
    metadata: Value,
    cents: i64,
    currency: &'a str,
    payment_status: &'a str,
}

impl<'a> Session<'a> {
    /// A paid USD session for `account` (its id or name in `client_reference_id`).
    fn paid(
        event: &'a str,
        id: &'a str,
        payment_intent: &'a str,
        account: &str,
        cents: i64,
    ) -> Self {
        Self {
            event,
            id,
            payment_intent,
            reference: json!(account),
            metadata: json!({}),
            cents,
            currency: "usd",
            payment_status: "paid",
        }
    }

    /// The event, shaped like the example in Stripe's docs.
    fn event(&self) -> String {
        json!({
            "id": self.event,
            "object": "event",
            "api_version": "2024-06-20",
            "created": now_secs(),
            "data": {"object": {
                "id": self.id,
                "object": "checkout.session",
                "after_expiration": null,
                "allow_promotion_codes": null,
                "amount_subtotal": self.cents,
                "amount_total": self.cents,
                "automatic_tax": {"enabled": false, "liability": null, "status": null},
                "billing_address_collection": null,
                "cancel_url": "https://market.example.com/cancel",
                "client_reference_id": self.reference,
                "consent": null,
                "created": now_secs() - 60,
                "currency": self.currency,
                "customer": null,
                "customer_creation": "if_required",
                "customer_details": {"email": "buyer@example.com", "name": "Buyer", "tax_exempt": "none"},
                "expires_at": now_secs() + 86_400,
                "livemode": false,
                "locale": null,
                "metadata": self.metadata,
                "mode": "payment",
                "payment_intent": self.payment_intent,
                "payment_method_types": ["card"],
                "payment_status": self.payment_status,
                "status": "complete",
                "success_url": "https://market.example.com/success",
                "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
                "url": null
            }},
            "livemode": false,
            "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null},
            "type": "checkout.session.completed"
        })
        .to_string()
    }
}

fn paid(event: &str, session: &str, pi: &str, account: &str, cents: i64) -> String {
    Session::paid(event, session, pi, account, cents).event()
}

/// A `charge.refunded` event (`amount_refunded` is cumulative over the charge's refunds).
fn refunded(event: &str, pi: &str, cents: i64, refunded: i64) -> String {
    json!({
        "id": event, "object": "event", "api_version": "2024-06-20", "created": now_secs(),
        "data": {"object": {
            "id": format!("ch_{pi}"), "object": "charge", "amount": cents, "amount_captured": cents,
            "amount_refunded": refunded, "captured": true, "currency": "usd", "livemode": false,
            "paid": true, "payment_intent": pi, "refunded": refunded == cents, "status": "succeeded"
        }},
        "livemode": false, "pending_webhooks": 1,
        "request": {"id": "req_refund", "idempotency_key": null},
        "type": "charge.refunded"
    })
    .to_string()
}

/// A `charge.dispute.created` event.
fn disputed(event: &str, dispute: &str, pi: &str, cents: i64) -> String {
    json!({
        "id": event, "object": "event", "api_version": "2024-06-20", "created": now_secs(),
        "data": {"object": {
            "id": dispute, "object": "dispute", "amount": cents, "charge": format!("ch_{pi}"),
            "currency": "usd", "is_charge_refundable": false, "livemode": false,
            "payment_intent": pi, "reason": "fraudulent", "status": "needs_response"
        }},
        "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": "charge.dispute.created"
    })
    .to_string()
}

async fn wallet(m: &Market, account_id: &str) -> i64 {
    m.app
        .ledger
        .account_balance(account_id)
        .await
        .unwrap()
        .wallet_micros
}

async fn ledger_rows(m: &Market) -> (i64, i64) {
    let pool = m.app.store.pool();
    let count = |q: &'static str| async move {
        sqlx::query(q)
            .fetch_one(pool)
            .await
            .unwrap()
            .try_get::<i64, _>(0)
            .unwrap()
    };
    (
        count("SELECT CAST(COUNT(*) AS BIGINT) FROM ledger_transfers").await,
        count("SELECT CAST(COUNT(*) AS BIGINT) FROM stripe_events").await,
    )
}

#[tokio::test]
async fn a_paid_checkout_credits_the_wallet_exactly_once() {
    for backend in backends() {
        let m = start(backend).await;
        let buyer = m.account("buyer").await;

        let evt1 = paid("evt_1Q0PaidA", "cs_test_a1", "pi_3PaidA", &buyer.id, 2_500);
        let (status, body) = deliver(&m.base, &evt1, Some(signed(&evt1))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], "credited");
        assert_eq!(body["amount_micros"], 25_000_000);
        assert_eq!(wallet(&m, &buyer.id).await, 25_000_000);

        // Stripe retries the same event (newly signed): acknowledged, not credited again.
        let (status, body) = deliver(&m.base, &evt1, Some(signed(&evt1))).await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("duplicate")));
        // The same payment reported by another event: not credited again either.
        let async_ok = evt1.replace("evt_1Q0PaidA", "evt_1Q0PaidA2").replace(
            "checkout.session.completed",
            "checkout.session.async_payment_succeeded",
        );
        let (status, body) = deliver(&m.base, &async_ok, Some(signed(&async_ok))).await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
        assert_eq!(wallet(&m, &buyer.id).await, 25_000_000);

        // Five concurrent deliveries of one event credit it once; the account is named
        // by metadata.account this time.
        let evt2 = Session {
            reference: Value::Null,
            metadata: json!({"account": "buyer"}),
            ..Session::paid("evt_1Q0PaidB", "cs_test_b1", "pi_3PaidB", "", 1_000)
        }
        .event();
        let outcomes =
            futures::future::join_all((0..5).map(|_| deliver(&m.base, &evt2, Some(signed(&evt2)))))
                .await;
        assert!(outcomes.iter().all(|(s, _)| *s == 200), "{outcomes:?}");
        let credited = outcomes
            .iter()
            .filter(|(_, b)| b["outcome"] == "credited")
            .count();
        assert_eq!(credited, 1, "{backend:?}: {outcomes:?}");
        assert_eq!(wallet(&m, &buyer.id).await, 35_000_000);

        // Acknowledged but not credited: an unpaid session, an unknown account, another
        // currency, an event type the marketplace does not use.
        let before = wallet(&m, &buyer.id).await;
        for (payload, reason) in [
            (
                Session {
                    payment_status: "unpaid",
                    ..Session::paid("evt_u1", "cs_u1", "pi_u1", &buyer.id, 500)
                }
                .event(),
                "not completed",
            ),
            (
                paid("evt_u2", "cs_u2", "pi_u2", "nobody", 500),
                "no known account",
            ),
            (
                Session {
                    currency: "eur",
                    ..Session::paid("evt_u3", "cs_u3", "pi_u3", &buyer.id, 500)
                }
                .event(),
                "not a USD",
            ),
            (
                json!({"id": "evt_u4", "object": "event", "type": "payment_intent.created",
                       "data": {"object": {"id": "pi_u4", "object": "payment_intent"}}})
                .to_string(),
                "not used",
            ),
        ] {
            let (status, body) = deliver(&m.base, &payload, Some(signed(&payload))).await;
            assert_eq!(
                (status, body["outcome"].as_str()),
                (200, Some("ignored")),
                "{body}"
            );
            assert!(body["reason"].as_str().unwrap().contains(reason), "{body}");
        }
        assert_eq!(wallet(&m, &buyer.id).await, before);
        // The invoice draft lists both payments.
        let month = mcp_marketplace::billing::Month::of_ms(m.app.ledger.now_ms());
        let (inv, _) = mcp_marketplace::billing::invoices::invoice(&m.app.ledger, &buyer.id, month)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inv.totals.credits_added_micros, 35_000_000);
        assert!(
            inv.credits
                .iter()
                .any(|c| c.description == "Stripe payment pi_3PaidA")
        );
        m.assert_ledger_ok().await;
        m.stop().await;
    }
}

#[tokio::test]
async fn wrong_stale_and_unsigned_deliveries_are_refused_and_change_nothing() {
    for backend in backends() {
        let m = start(backend).await;
        let buyer = m.account("buyer").await;
        let payload = paid("evt_sig", "cs_sig", "pi_sig", &buyer.id, 4_200);
        let t = now_secs();
        let before = ledger_rows(&m).await;
        let tampered = payload.replace("4200", "420000");
        for (body, signature, kind) in [
            (payload.clone(), None, "invalid_signature"),
            (
                payload.clone(),
                Some(format!("t={t},v1={}", sign("whsec_other", t, &payload))),
                "invalid_signature",
            ),
            (
                tampered.clone(),
                Some(format!("t={t},v1={}", sign(SECRET, t, &payload))),
                "invalid_signature",
            ),
            (
                payload.clone(),
                Some(format!("t={t},v0={}", sign(SECRET, t, &payload))),
                "invalid_signature",
            ),
            (
                payload.clone(),
                Some(format!("v1={}", sign(SECRET, t, &payload))),
                "invalid_signature",
            ),
            (payload.clone(), Some("garbage".into()), "invalid_signature"),
            (
                payload.clone(),
                Some(format!(
                    "t={},v1={}",
                    t - 360,
                    sign(SECRET, t - 360, &payload)
                )),
                "stale_signature",
            ),
            (
                payload.clone(),
                Some(format!(
                    "t={},v1={}",
                    t + 360,
                    sign(SECRET, t + 360, &payload)
                )),
                "stale_signature",
            ),
            (
                "not json".into(),
                Some(format!("t={t},v1={}", sign(SECRET, t, "not json"))),
                "invalid_payload",
            ),
            (
                r#"{"type":"checkout.session.completed"}"#.into(),
                Some(format!(
                    "t={t},v1={}",
                    sign(SECRET, t, r#"{"type":"checkout.session.completed"}"#)
                )),
                "invalid_payload",
            ),
        ] {
            let (status, resp) = deliver(&m.base, &body, signature.clone()).await;
            assert_eq!(status, 400, "{signature:?}: {resp}");
            assert_eq!(resp["error"]["kind"], kind, "{signature:?}: {resp}");
            assert!(!resp.to_string().contains(SECRET), "the secret never leaks");
        }
        assert_eq!(ledger_rows(&m).await, before, "{backend:?}");
        assert_eq!(wallet(&m, &buyer.id).await, 0);

        // Within the tolerance, with a rolled secret's old signature next to the right one.
        let t = now_secs() - 240;
        let header = format!(
            "t={t},v1={},v1={}",
            sign("whsec_previous", t, &payload),
            sign(SECRET, t, &payload)
        );
        let (status, body) = deliver(&m.base, &payload, Some(header)).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("credited")),
            "{body}"
        );
        assert_eq!(wallet(&m, &buyer.id).await, 42_000_000);
        m.assert_ledger_ok().await;
        m.stop().await;

        // Without a configured secret the endpoint refuses everything.
        let bare = Market::start(TestDb::new(backend).await).await;
        let (status, body) = deliver(&bare.base, &payload, Some(signed(&payload))).await;
        assert_eq!(
            (status, body["error"]["kind"].as_str()),
            (503, Some("not_configured"))
        );
        bare.stop().await;
    }
}

#[tokio::test]
async fn refunds_and_disputes_reverse_payments_up_to_their_amount() {
    for backend in backends() {
        let w = World::start_with(backend, 0, |c, _| {
            c.billing.stripe_webhook_secret = Some(WebhookSecret::new(SECRET));
        })
        .await;
        let m = &w.market;
        let user = &w.user;
        let send = |payload: String| async move {
            let (status, body) = deliver(&m.base, &payload, Some(signed(&payload))).await;
            assert_eq!(status, 200, "{body}");
            body
        };

        // 20 USD paid; 5 refunded; the same cumulative refund reported again; 8 in all.
        send(paid("evt_p1", "cs_p1", "pi_A", &user.id, 2_000)).await;
        let b = send(refunded("evt_r1", "pi_A", 2_000, 500)).await;
        assert_eq!(b["reversed_micros"], 5_000_000);
        let b = send(refunded("evt_r2", "pi_A", 2_000, 500)).await;
        assert_eq!(b["reversed_micros"], 0);
        send(refunded("evt_r3", "pi_A", 2_000, 800)).await;
        assert_eq!(wallet(m, &user.id).await, 12_000_000);
        // A dispute of the whole charge reverses only what is left of it; its second
        // report (another event, same dispute) nothing.
        let b = send(disputed("evt_d1", "dp_1", "pi_A", 2_000)).await;
        assert_eq!(
            (b["reversed_micros"].as_i64(), b["loss_micros"].as_i64()),
            (Some(12_000_000), Some(0))
        );
        send(disputed("evt_d2", "dp_1", "pi_A", 2_000)).await;
        assert_eq!(wallet(m, &user.id).await, 0);

        // A refund that arrives before its payment is applied when the payment comes.
        let b = send(refunded("evt_r4", "pi_C", 1_000, 1_000)).await;
        assert_eq!(b["reversed_micros"], 0);
        send(paid("evt_p3", "cs_p3", "pi_C", &user.id, 1_000)).await;
        assert_eq!(wallet(m, &user.id).await, 0);

        // 5 cents paid, 4 spent on two calls, then all refunded: the wallet gives back
        // its 1 cent and the platform books the 4 as a loss.
        send(paid("evt_p2", "cs_p2", "pi_B", &user.id, 5)).await;
        let client = m.client(&w.key).await;
        for _ in 0..2 {
            let r = client
                .call_tool(
                    CallToolRequestParams::new("units__convert")
                        .with_arguments(args(json!({"value": 1, "from": "km", "to": "m"}))),
                )
                .await
                .unwrap();
            assert_ne!(r.is_error, Some(true), "{r:?}");
        }
        client.cancel().await.ok();
        assert_eq!(wallet(m, &user.id).await, 10_000);
        let b = send(refunded("evt_r5", "pi_B", 5, 5)).await;
        assert_eq!(
            (b["reversed_micros"].as_i64(), b["loss_micros"].as_i64()),
            (Some(50_000), Some(40_000))
        );
        assert_eq!(wallet(m, &user.id).await, 0);
        assert_eq!(m.platform().await.losses_micros, -40_000);
        // What went out to the cardholder came back out of the ledger: 20 + 10 + 0.05 in,
        // the same out.
        let topups: i64 =
            sqlx::query("SELECT balance FROM ledger_accounts WHERE id = 'external:topups'")
                .fetch_one(m.app.store.pool())
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
        assert_eq!(topups, 0);
        m.assert_ledger_ok().await;
        w.stop().await;
    }
}
