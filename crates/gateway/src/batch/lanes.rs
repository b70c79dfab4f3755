//! Batch lanes: the **realtime** lane (each item through the router, at the route's realtime
//! price) and the **native** lane (every item submitted to one provider's own batch API, at
//! the route's batch price, finished within 24 hours).
//!
//! A [`Tally`] looks at a batch's items one by one (or a quote's samples, per model): for each
//! route of the model it keeps the first reason the native lane on that route is impossible —
//! the provider has no native API (`no_native_api`), the route has no batch price
//! (`no_batch_price`), an item is not a chat request (`operation`), brings its own key
//! (`byok`), or an item's plan excluded the route (its reason: `residency`, `ignored`, `zdr`…)
//! — and the estimated cost of both lanes. [`Tally::decide`] then rejects every native lane
//! whose worst-case completion (24 h) is longer than the batch's completion window
//! (`completion_window`) and picks the cheaper lane that meets it. Residency therefore never
//! loosens: a native route is used only if every item's own plan kept it.

use std::sync::Arc;

use rust_decimal::Decimal;

use crate::error::ApiError;
use crate::money::{Fx, TokenCounts};
use crate::pipeline::plan::Plan;
use crate::registry::{Model, Route};

/// How long a provider's native batch may take (OpenAI and Anthropic promise 24 hours).
pub const NATIVE_COMPLETION_MS: i64 = 24 * 3600 * 1000;
/// Seconds a realtime item is assumed to take, for the realtime lane's expected completion.
const REALTIME_ITEM_S: u64 = 10;

/// One route's native lane, as far as the items seen allow.
#[derive(Clone)]
pub struct NativeLane {
    pub route: Arc<Route>,
    /// Why this route's native lane cannot run the batch, if it cannot.
    pub rejection: Option<&'static str>,
    /// The items' estimated cost at the batch price, in USD.
    pub cost_usd: Decimal,
}

/// The lanes of one model's items.
pub struct Tally {
    model: Arc<Model>,
    /// Another model was seen: only the realtime lane can run the batch.
    mixed: bool,
    pub items: u64,
    /// The items' estimated cost on their plans' first routes, in USD.
    pub realtime_usd: Decimal,
    pub lanes: Vec<NativeLane>,
}

/// What an item looks like to the lane choice.
pub struct Sample<'a> {
    pub model: &'a Arc<Model>,
    /// The item's plan with its own routing preferences; `Err`: it has no route at all.
    pub plan: Result<&'a Plan, &'static str>,
    pub tokens: TokenCounts,
    pub chat: bool,
    pub byok: bool,
}

/// The decision for a batch.
pub struct Decision {
    /// The native lane's route when it is chosen.
    pub native: Option<Arc<Route>>,
    pub lanes: Vec<NativeLane>,
}

fn static_rejection(route: &Route) -> Option<&'static str> {
    if !route.provider.kind().has_native_batch() {
        Some("no_native_api")
    } else if route.batch_price.is_none() {
        Some("no_batch_price")
    } else {
        None
    }
}

impl Tally {
    pub fn new(model: &Arc<Model>) -> Tally {
        let lanes = model
            .routes
            .iter()
            .map(|r| NativeLane { route: Arc::clone(r), rejection: static_rejection(r), cost_usd: Decimal::ZERO })
            .collect();
        Tally { model: Arc::clone(model), mixed: false, items: 0, realtime_usd: Decimal::ZERO, lanes }
    }

    /// Adds one item.
    pub fn add(&mut self, sample: &Sample<'_>, fx: &Fx) {
        self.items += 1;
        if !Arc::ptr_eq(sample.model, &self.model) {
            self.mixed = true;
            return;
        }
        if let Ok(Some(first)) = sample.plan.map(|p| p.candidates.first()) {
            self.realtime_usd += fx.to_usd(first.route.price.cost(sample.tokens));
        }
        for lane in self.lanes.iter_mut().filter(|l| l.rejection.is_none()) {
            lane.rejection = item_rejection(&lane.route, &self.model, sample);
            if let (None, Some(price)) = (lane.rejection, &lane.route.batch_price) {
                lane.cost_usd += fx.to_usd(price.cost(sample.tokens));
            }
        }
    }

    /// The cheaper lane that meets a completion window of `window_ms`.
    pub fn decide(&self, window_ms: i64) -> Decision {
        let mut lanes = self.lanes.clone();
        for lane in lanes.iter_mut().filter(|l| l.rejection.is_none()) {
            if self.mixed {
                lane.rejection = Some("mixed_models");
            } else if window_ms < NATIVE_COMPLETION_MS {
                lane.rejection = Some("completion_window");
            } else if lane.cost_usd >= self.realtime_usd && self.items > 0 {
                lane.rejection = Some("not_cheaper");
            }
        }
        let native = lanes
            .iter()
            .filter(|l| l.rejection.is_none())
            .min_by(|a, b| a.cost_usd.cmp(&b.cost_usd))
            .map(|l| Arc::clone(&l.route));
        Decision { native, lanes }
    }
}

/// Why `sample` keeps the native lane on `route` from running it, if it does.
fn item_rejection(route: &Arc<Route>, model: &Arc<Model>, sample: &Sample<'_>) -> Option<&'static str> {
    if !sample.chat {
        return Some("operation");
    }
    if sample.byok {
        return Some("byok");
    }
    let plan = match sample.plan {
        Ok(plan) => plan,
        Err(reason) => return Some(reason),
    };
    let planned = plan.candidates.iter().any(|c| Arc::ptr_eq(&c.route, route) && Arc::ptr_eq(&c.model, model));
    if planned {
        return None;
    }
    let label = route.label();
    Some(plan.skipped.iter().find(|s| s.route == label).map_or("not_planned", |s| s.reason))
}

/// The realtime lane's expected completion for `items`, in seconds: a rough figure (each
/// item about [`REALTIME_ITEM_S`], `per_provider` at once).
pub fn realtime_expected_s(items: u64, per_provider: usize) -> u64 {
    items.div_ceil(per_provider.max(1) as u64).max(1) * REALTIME_ITEM_S
}

/// A completion window: `<n>h` or `<n>m`, from 1 minute to 24 hours, in milliseconds.
pub fn parse_window(window: &str) -> Result<i64, ApiError> {
    let invalid = || ApiError::invalid("`completion_window` must be like \"24h\" or \"30m\" (at most 24h)", Some("completion_window".into()));
    let (number, unit_ms) = match window.strip_suffix('h') {
        Some(n) => (n, 3600 * 1000),
        None => (window.strip_suffix('m').ok_or_else(invalid)?, 60 * 1000),
    };
    let n: i64 = number.parse().map_err(|_| invalid())?;
    let ms = n.checked_mul(unit_ms).ok_or_else(invalid)?;
    if !(60_000..=NATIVE_COMPLETION_MS).contains(&ms) {
        return Err(invalid());
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn windows_parse_within_a_minute_and_a_day() {
        assert_eq!(parse_window("24h").unwrap(), NATIVE_COMPLETION_MS);
        assert_eq!(parse_window("30m").unwrap(), 30 * 60 * 1000);
        for bad in ["25h", "0m", "h", "1d", "-1h", ""] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn realtime_expectation_grows_with_items_per_slot() {
        assert_eq!(realtime_expected_s(1, 32), 10);
        assert_eq!(realtime_expected_s(64, 32), 20);
    }
}
