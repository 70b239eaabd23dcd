//! Ratings and reviews: 1–5 stars and text, only from an account with at least one
//! settled paid call to the server, one per account per server (writing again edits
//! it), and one reply by the server's creator.

use sqlx::Row;

use super::{Catalog, CatalogError, Server, is_invisible};
use crate::store::{StoreError, now_ms};

/// Longest review or reply text (characters).
pub const MAX_REVIEW_LEN: usize = 2000;
/// Most reviews returned at once.
pub const MAX_REVIEWS_LISTED: i64 = 100;

/// Why a review or reply was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Stars outside 1–5.
    #[error("a rating is 1 to 5 stars")]
    InvalidRating,
    /// Too long or with invisible/control characters.
    #[error("the text must be at most 2000 printable characters")]
    InvalidText,
    /// The account never made a settled paid call to the server.
    #[error(
        "only accounts that made at least one paid call to '{0}' may review it; make a call first"
    )]
    NoPaidCall(String),
    /// A creator reviewing their own server.
    #[error("creators cannot review their own server")]
    OwnServer,
    /// No such review of this server.
    #[error("no such review")]
    UnknownReview,
    /// The creator replied already.
    #[error("the creator already replied to this review")]
    AlreadyReplied,
    /// A catalog or store failure.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl From<sqlx::Error> for ReviewError {
    fn from(e: sqlx::Error) -> Self {
        Self::Catalog(e.into())
    }
}

/// A review as shown.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Review {
    /// UUIDv7.
    pub id: String,
    /// The reviewer's account name.
    pub account: String,
    /// 1–5.
    pub rating: i64,
    /// The text.
    pub body: String,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last edit.
    pub updated_at: i64,
    /// The creator's reply.
    pub reply: Option<String>,
    /// Epoch ms of the reply.
    pub replied_at: Option<i64>,
}

fn check_text(text: &str) -> Result<(), ReviewError> {
    if text.chars().count() > MAX_REVIEW_LEN
        || text
            .chars()
            .any(|c| (c.is_control() && !matches!(c, '\n' | '\t')) || is_invisible(c))
    {
        return Err(ReviewError::InvalidText);
    }
    Ok(())
}

impl Catalog {
    /// Writes (or edits) the review of `account_id` for `server`: `rating` 1–5 and
    /// `body`. Returns the review and whether it was new.
    ///
    /// # Errors
    /// [`ReviewError::InvalidRating`], [`ReviewError::InvalidText`],
    /// [`ReviewError::OwnServer`], [`ReviewError::NoPaidCall`] (no settled call with a
    /// price above zero), [`ReviewError::Catalog`].
    pub async fn rate(
        &self,
        account_id: &str,
        server: &Server,
        rating: i64,
        body: &str,
    ) -> Result<(Review, bool), ReviewError> {
        if !(1..=5).contains(&rating) {
            return Err(ReviewError::InvalidRating);
        }
        let body = body.trim();
        check_text(body)?;
        if server.owner_account_id == account_id {
            return Err(ReviewError::OwnServer);
        }
        let paid = sqlx::query(
            "SELECT 1 FROM calls WHERE account_id = $1 AND server_id = $2 AND status = 'settled' \
             AND price_micros > 0 LIMIT 1",
        )
        .bind(account_id)
        .bind(&server.id)
        .fetch_optional(self.store.pool())
        .await?
        .is_some();
        if !paid {
            return Err(ReviewError::NoPaidCall(server.slug.clone()));
        }
        let now = now_ms();
        let mut tx = self.store.begin().await.map_err(CatalogError::from)?;
        let updated = sqlx::query(
            "UPDATE reviews SET rating = $1, body = $2, updated_at = $3 WHERE server_id = $4 AND account_id = $5",
        )
        .bind(rating)
        .bind(body)
        .bind(now)
        .bind(&server.id)
        .bind(account_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let created = updated == 0;
        if created {
            sqlx::query(
                "INSERT INTO reviews (id, server_id, account_id, rating, body, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&server.id)
            .bind(account_id)
            .bind(rating)
            .bind(body)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit()
            .await
            .map_err(|e| CatalogError::from(StoreError::from(e)))?;
        let review = self
            .review_rows(
                "WHERE r.server_id = $1 AND r.account_id = $2",
                &server.id,
                Some(account_id),
            )
            .await?
            .pop()
            .ok_or(ReviewError::UnknownReview)?;
        Ok((review, created))
    }

    /// The creator's one reply to review `review_id` of `server`.
    ///
    /// # Errors
    /// [`ReviewError::InvalidText`], [`ReviewError::UnknownReview`],
    /// [`ReviewError::AlreadyReplied`], [`ReviewError::Catalog`].
    pub async fn reply(
        &self,
        server: &Server,
        review_id: &str,
        text: &str,
    ) -> Result<Review, ReviewError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ReviewError::InvalidText);
        }
        check_text(text)?;
        let exists = sqlx::query("SELECT reply FROM reviews WHERE id = $1 AND server_id = $2")
            .bind(review_id)
            .bind(&server.id)
            .fetch_optional(self.store.pool())
            .await?
            .ok_or(ReviewError::UnknownReview)?;
        if exists.try_get::<Option<String>, _>(0)?.is_some() {
            return Err(ReviewError::AlreadyReplied);
        }
        let n = sqlx::query(
            "UPDATE reviews SET reply = $1, replied_at = $2 WHERE id = $3 AND server_id = $4 AND reply IS NULL",
        )
        .bind(text)
        .bind(now_ms())
        .bind(review_id)
        .bind(&server.id)
        .execute(self.store.pool())
        .await?
        .rows_affected();
        if n == 0 {
            return Err(ReviewError::AlreadyReplied);
        }
        self.review_rows(
            "WHERE r.server_id = $1 AND r.id = $2",
            &server.id,
            Some(review_id),
        )
        .await?
        .pop()
        .ok_or(ReviewError::UnknownReview)
    }

    /// The reviews of `server_id`, newest first, at most [`MAX_REVIEWS_LISTED`].
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn reviews(&self, server_id: &str) -> Result<Vec<Review>, CatalogError> {
        self.review_rows("WHERE r.server_id = $1", server_id, None)
            .await
    }

    /// Reviews selected by `filter` (`$1` the server id, `$2` the optional second bind).
    async fn review_rows(
        &self,
        filter: &str,
        server_id: &str,
        second: Option<&str>,
    ) -> Result<Vec<Review>, CatalogError> {
        let sql = format!(
            "SELECT r.id, a.name, r.rating, r.body, r.created_at, r.updated_at, r.reply, r.replied_at \
             FROM reviews r JOIN accounts a ON a.id = r.account_id {filter} \
             ORDER BY r.updated_at DESC, r.id DESC LIMIT {MAX_REVIEWS_LISTED}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(server_id);
        if let Some(s) = second {
            q = q.bind(s);
        }
        q.fetch_all(self.store.pool())
            .await?
            .into_iter()
            .map(|r| {
                Ok(Review {
                    id: r.try_get(0)?,
                    account: r.try_get(1)?,
                    rating: r.try_get(2)?,
                    body: r.try_get(3)?,
                    created_at: r.try_get(4)?,
                    updated_at: r.try_get(5)?,
                    reply: r.try_get(6)?,
                    replied_at: r.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}
