//! Admission and settlement: what an authenticated request must pass before any upstream is
//! called (rate limits, guardrails, spend caps, a credit reservation), and what it pays after.
//!
//! Order at admission: per-minute and per-day counts → guardrail model rules → spend caps
//! (key limit, key budget, guardrail caps) held for the request's maximum cost → a credit
//! reservation of that maximum from the organisation's lease. Each refusal has its documented
//! code. At settlement the actual cost — `tokens × route price`, converted to the
//! organisation's currency at the configured FX rate and rounded up to the nano — is charged,
//! and the rest of the reservation and holds is released.

use std::sync::Arc;

use marga_store::{GuardrailRecord, LedgerEntry};
use rust_decimal::Decimal;

use crate::accounts::{Accounts, OrgInfo, Principal};
use crate::budget::{Cap, Hold, Period, Scope, SpendTracker};
use crate::error::ApiError;
use crate::ledger::{Ledger, LedgerError, Reservation};
use crate::limits::{LimitDefaults, Limiter, Quota, Refusal};
use crate::money::{decimal_to_nanos_ceil, nanos_to_decimal, Currency, Fx, Money, TokenCounts, TokenPrice};
use crate::pipeline::unix_now_ms;
use crate::registry::Route;

pub struct Admission {
    pub accounts: Arc<Accounts>,
    pub ledger: Arc<Ledger>,
    pub spend: Arc<SpendTracker>,
    pub limiter: Limiter,
    pub defaults: LimitDefaults,
    /// New inference keys are trial keys (free, capped) — `[billing] trial_keys`.
    pub trial_keys: bool,
    pub fx: Fx,
}

/// How a request pays.
enum Mode {
    /// The master key's default organisation: charged, never refused.
    Metered,
    /// Trial keys: free.
    Free,
    /// Everyone else: reserved at admission, charged at settlement.
    Limited { reservation: Reservation, hold: Hold },
    /// A batch item: its credit was reserved with the batch (a lease of its own); charged
    /// against that lease.
    BatchLease { lease_id: String, hold: Hold },
}

/// A request's money, from admission to settlement. Dropped unsettled (the request failed
/// before any cost), it releases everything it held.
pub struct Billing {
    mode: Mode,
    org: Arc<OrgInfo>,
    key_id: String,
    workspace_id: Option<String>,
    ledger: Arc<Ledger>,
    fx: Fx,
}

impl Admission {
    /// Counts the request against its key's and IP's per-minute and per-day limits.
    pub async fn count(&self, principal: &Principal, ip: Option<std::net::IpAddr>) -> Result<Quota, ApiError> {
        self.limiter.admit(principal, ip, &self.defaults, unix_now_ms()).await.map_err(|refusal| match refusal {
            Refusal::PerMinute { limit, retry_after_s } => ApiError::RateLimited {
                code: "rate_limit_exceeded",
                message: format!("rate limit of {limit} requests per minute reached"),
                retry_after_s,
            },
            Refusal::PerDay { limit, retry_after_s } => ApiError::RateLimited {
                code: "daily_limit_reached",
                message: format!("daily limit of {limit} requests reached; it resets at midnight"),
                retry_after_s,
            },
            Refusal::Unavailable => {
                ApiError::Unavailable { message: "the rate-limit store is unavailable; try again shortly".to_owned() }
            }
        })
    }

    /// The guardrails that apply to the caller's key: its own and its member's (from the
    /// in-memory cache).
    pub fn guardrails(&self, principal: &Principal) -> Vec<Arc<GuardrailRecord>> {
        self.accounts.guardrails_of(&principal.key)
    }

    /// Holds the spend caps and reserves credit for at most `max_cost` (in the route's
    /// currency; converted here).
    pub async fn reserve(&self, principal: &Principal, max_cost: Money) -> Result<Billing, ApiError> {
        let org = Arc::clone(&principal.org);
        let key = &principal.key;
        let billing = |mode| Billing {
            mode,
            org: Arc::clone(&org),
            key_id: key.id.clone(),
            workspace_id: key.workspace_id.clone(),
            ledger: Arc::clone(&self.ledger),
            fx: self.fx.clone(),
        };
        if principal.is_master() {
            return Ok(billing(Mode::Metered));
        }
        if key.trial {
            return Ok(billing(Mode::Free));
        }
        let amount = decimal_to_nanos_ceil(self.fx.convert(max_cost, org.currency).amount);
        let caps = self.caps(principal);
        let hold = self.spend.hold(&caps, org.timezone, amount).await.map_err(|over| ApiError::BudgetExceeded {
            message: format!("{} ({} {}) would be exceeded", over.label, over.cap, org.currency),
        })?;
        let reservation = self.ledger.reserve(&org.id, amount).await.map_err(|e| match e {
            LedgerError::Insufficient => ApiError::InsufficientCredits,
            other => ApiError::Unavailable { message: format!("the credit ledger is unavailable: {other}") },
        })?;
        Ok(billing(Mode::Limited { reservation, hold }))
    }

    /// A batch item's billing: the spend caps are held for `max_cost` as for a request, the
    /// credit comes from the batch's lease (reserved when the batch was created).
    pub async fn reserve_batch_item(&self, principal: &Principal, max_cost: Money, lease_id: &str) -> Result<Billing, ApiError> {
        let org = &principal.org;
        let amount = decimal_to_nanos_ceil(self.fx.convert(max_cost, org.currency).amount);
        let caps = self.caps(principal);
        let hold = self.spend.hold(&caps, org.timezone, amount).await.map_err(|over| ApiError::BudgetExceeded {
            message: format!("{} ({} {}) would be exceeded", over.label, over.cap, org.currency),
        })?;
        Ok(Billing {
            mode: Mode::BatchLease { lease_id: lease_id.to_owned(), hold },
            org: Arc::clone(org),
            key_id: principal.key.id.clone(),
            workspace_id: principal.key.workspace_id.clone(),
            ledger: Arc::clone(&self.ledger),
            fx: self.fx.clone(),
        })
    }

    /// Reserves a whole batch's maximum cost as a lease of its own (see
    /// [`Ledger::open_batch_lease`]); `None` for payers that are not limited (the master key's
    /// organisation is metered, trial keys are free).
    pub async fn reserve_batch(&self, principal: &Principal, max_cost: Money, batch_id: &str, until_ms: i64) -> Result<Option<String>, ApiError> {
        if principal.is_master() || principal.key.trial {
            return Ok(None);
        }
        let amount = decimal_to_nanos_ceil(self.fx.convert(max_cost, principal.org.currency).amount);
        match self.ledger.open_batch_lease(&principal.org.id, amount, batch_id, until_ms).await {
            Ok(lease) => Ok(Some(lease)),
            Err(LedgerError::Insufficient) => Err(ApiError::InsufficientCredits),
            Err(other) => Err(ApiError::Unavailable { message: format!("the credit ledger is unavailable: {other}") }),
        }
    }

    fn caps(&self, principal: &Principal) -> Vec<Cap> {
        let key = &principal.key;
        let cap = |period, cap_nanos, label: String| Cap {
            org_id: principal.org.id.clone(),
            scope: Scope::Key(key.id.clone()),
            period,
            cap_nanos,
            label,
        };
        let mut caps = Vec::new();
        if let Some(limit) = key.limit_nanos {
            caps.push(cap(Period::parse(key.limit_reset.as_deref()), limit, "the key's credit limit".to_owned()));
        }
        if let Some(budget) = key.budget_nanos {
            caps.push(cap(Period::Month, budget, "the key's monthly budget".to_owned()));
        }
        let workspace = key.workspace_id.as_deref().and_then(|id| self.accounts.workspace(id));
        if let Some(ws) = workspace.filter(|ws| ws.org_id == principal.org.id) {
            if let Some(budget) = ws.monthly_budget_nanos {
                caps.push(Cap {
                    org_id: principal.org.id.clone(),
                    scope: Scope::Workspace(ws.id.clone()),
                    period: Period::Month,
                    cap_nanos: budget,
                    label: format!("workspace \"{}\" monthly budget", ws.name),
                });
            }
        }
        for (g, member) in self.accounts.guardrails_with_member(key) {
            let name = &g.name;
            for (period, value) in [
                (Period::Day, g.max_daily_spend_nanos),
                (Period::Week, g.max_weekly_spend_nanos),
                (Period::Month, g.max_monthly_spend_nanos),
            ] {
                if let Some(v) = value {
                    let mut cap = cap(period, v, format!("guardrail \"{name}\" {} spend cap", period.as_str()));
                    if let Some(member) = &member {
                        cap.scope = Scope::Member(member.clone());
                    }
                    caps.push(cap);
                }
            }
        }
        caps
    }
}

/// Checks a guardrail's model rules for `model_id`.
pub fn check_models(guardrail: &GuardrailRecord, model_id: &str) -> Result<(), ApiError> {
    let list = |json: &str| serde_json::from_str::<Vec<String>>(json).unwrap_or_default();
    let allowed = list(&guardrail.allowed_models);
    if !allowed.is_empty() && !allowed.iter().any(|m| m == model_id) {
        return Err(ApiError::Forbidden { message: format!("guardrail \"{}\" does not allow `{model_id}`", guardrail.name) });
    }
    if list(&guardrail.blocked_models).iter().any(|m| m == model_id) {
        return Err(ApiError::Forbidden { message: format!("guardrail \"{}\" blocks `{model_id}`", guardrail.name) });
    }
    Ok(())
}

impl Billing {
    /// What `tokens` on `route` cost the organisation, rounded up to the nano.
    pub fn cost(&self, route: &Route, tokens: TokenCounts) -> Money {
        self.cost_at(&route.price, tokens)
    }

    /// What `tokens` at `price` (a route's batch price, say) cost the organisation, rounded
    /// up to the nano.
    pub fn cost_at(&self, price: &TokenPrice, tokens: TokenCounts) -> Money {
        let converted = self.fx.convert(price.cost(tokens), self.org.currency);
        Money { amount: nanos_to_decimal(decimal_to_nanos_ceil(converted.amount)), currency: self.org.currency }
    }

    pub fn currency(&self) -> Currency {
        self.org.currency
    }

    /// Charges `cost` for generation `reference` (durably) and releases the rest.
    pub async fn settle(self, reference: &str, cost: Money) -> Result<(), ApiError> {
        let nanos = decimal_to_nanos_ceil(cost.amount);
        let entry = LedgerEntry {
            org_id: self.org.id.clone(),
            amount_nanos: -nanos,
            currency: self.org.currency.code().to_owned(),
            kind: "charge".to_owned(),
            reference: reference.to_owned(),
            key_id: Some(self.key_id.clone()),
            workspace_id: self.workspace_id.clone(),
            note: None,
            created_at_ms: unix_now_ms(),
            ..LedgerEntry::default()
        };
        let result = match self.mode {
            Mode::Free => Ok(()),
            Mode::Metered => self.ledger.charge_unreserved(entry).await,
            Mode::Limited { reservation, hold } => {
                hold.settle(nanos);
                self.ledger.settle(reservation, entry).await
            }
            Mode::BatchLease { lease_id, hold } => {
                hold.settle(nanos);
                self.ledger.charge_lease(&lease_id, entry).await
            }
        };
        result.map_err(|e| ApiError::Unavailable { message: format!("could not record the charge: {e}") })
    }

    /// Free requests cost nothing to the payer.
    pub fn is_free(&self) -> bool {
        matches!(self.mode, Mode::Free)
    }
}

/// The most a request can cost on any of `routes`: `prompt_upper` prompt tokens and
/// `max_output` completion tokens, priced on the dearest route (in USD for comparison, but
/// returned in that route's currency).
pub fn max_cost<'a>(routes: impl Iterator<Item = &'a Route>, prompt_upper: u64, max_output: u64, fx: &Fx) -> Money {
    let tokens = TokenCounts { prompt: prompt_upper, completion: max_output, cached: 0 };
    routes
        .map(|r| r.price.cost(tokens))
        .max_by(|a, b| fx.to_usd(*a).cmp(&fx.to_usd(*b)))
        .unwrap_or(Money { amount: Decimal::ZERO, currency: Currency::Usd })
}
