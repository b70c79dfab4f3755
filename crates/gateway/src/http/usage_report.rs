//! The shapes of the usage endpoints and the pure aggregation behind them: rollup rows
//! (`marga_store::UsageRow`, one per local day × key × model × provider) folded into day
//! series, top lists, per-provider costs and totals. Costs are summed in integer nanos and
//! rendered as exact JSON numbers in the organisation's currency.

use std::collections::{BTreeMap, HashMap};

use marga_store::UsageRow;
use serde::Serialize;
use serde_json::value::RawValue;

use super::money_json::exact;
use crate::error::ApiError;
use crate::money::nanos_to_decimal;

/// An exact amount (a raw JSON number).
pub type Amount = Option<Box<RawValue>>;

/// Julian day of 1970-01-01.
const UNIX_EPOCH_JULIAN: i64 = 2_440_588;

pub fn amount(nanos: i64) -> Amount {
    exact(nanos_to_decimal(nanos))
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01).
pub fn date_of(day: i64) -> String {
    i32::try_from(day + UNIX_EPOCH_JULIAN)
        .ok()
        .and_then(|j| time::Date::from_julian_day(j).ok())
        .map_or_else(String::new, |d| d.to_string())
}

/// The day number of a `YYYY-MM-DD` date, or a 400 naming `param`.
pub fn parse_date(text: &str, param: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::invalid(format!("`{param}` must be a date as YYYY-MM-DD, not `{text}`"), Some(param.to_owned()));
    let mut parts = text.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let (y, m, d): (i32, u8, u8) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
    let month = time::Month::try_from(m).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    Ok(i64::from(date.to_julian_day()) - UNIX_EPOCH_JULIAN)
}

/// Sums of a set of rollup rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: i64,
    pub errors: i64,
    pub cancelled: i64,
    pub byok_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    pub cost_nanos: i64,
}

impl Sums {
    pub fn add(&mut self, r: &UsageRow) {
        self.requests += r.requests;
        self.errors += r.errors;
        self.cancelled += r.cancelled;
        self.byok_requests += r.byok_requests;
        self.prompt_tokens = self.prompt_tokens.saturating_add(r.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(r.completion_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(r.reasoning_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(r.cached_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(r.cost_nanos);
    }

    pub fn tokens(&self) -> i64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    pub fn view(&self) -> SumsView {
        SumsView {
            requests: self.requests,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cached_tokens: self.cached_tokens,
            total_tokens: self.tokens(),
            cost: amount(self.cost_nanos),
            errors: self.errors,
            cancelled: self.cancelled,
            byok_requests: self.byok_requests,
        }
    }
}

/// Sums as JSON.
#[derive(Serialize)]
pub struct SumsView {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    pub total_tokens: i64,
    pub cost: Amount,
    pub errors: i64,
    pub cancelled: i64,
    pub byok_requests: i64,
}

/// Sums grouped by a key, in key order.
pub fn group_by<K: Ord>(rows: &[UsageRow], key: impl Fn(&UsageRow) -> K) -> BTreeMap<K, Sums> {
    let mut out: BTreeMap<K, Sums> = BTreeMap::new();
    for r in rows {
        out.entry(key(r)).or_default().add(r);
    }
    out
}

pub fn total(rows: &[UsageRow]) -> Sums {
    let mut sums = Sums::default();
    rows.iter().for_each(|r| sums.add(r));
    sums
}

/// Names of the organisation's keys by id (the master key included).
pub type KeyNames = HashMap<String, String>;

/// `null` for "no key", else the id.
fn key_ref(id: &str) -> Option<String> {
    (!id.is_empty()).then(|| id.to_owned())
}

/// One day of the activity series.
#[derive(Serialize)]
pub struct DayView {
    pub date: String,
    #[serde(flatten)]
    pub sums: SumsView,
}

#[derive(Serialize)]
pub struct ModelView {
    pub model: String,
    #[serde(flatten)]
    pub sums: SumsView,
}

#[derive(Serialize)]
pub struct KeyView {
    pub key_id: Option<String>,
    pub key_name: Option<String>,
    #[serde(flatten)]
    pub sums: SumsView,
}

#[derive(Serialize)]
pub struct ProviderView {
    pub provider: String,
    pub requests: i64,
    pub total_tokens: i64,
    pub cost: Amount,
}

#[derive(Serialize)]
pub struct ModelProviderView {
    pub model: String,
    pub provider: String,
    pub requests: i64,
    pub total_tokens: i64,
    pub cost: Amount,
}

/// `GET /me/activity`.
#[derive(Serialize)]
pub struct Activity {
    pub from: String,
    pub to: String,
    pub timezone: String,
    pub currency: &'static str,
    pub days: Vec<DayView>,
    pub top_models: Vec<ModelView>,
    pub top_keys: Vec<KeyView>,
    /// Realised cost per provider (a failed-over request counts at the provider that served).
    pub providers: Vec<ProviderView>,
    pub model_providers: Vec<ModelProviderView>,
    pub totals: SumsView,
    pub models: Vec<String>,
    pub keys: Vec<Option<String>>,
}

/// How many entries the top lists keep.
pub const TOP: usize = 10;

/// Entries with the most tokens first (then most requests, then by name).
fn by_tokens<K: Ord + Clone>(groups: BTreeMap<K, Sums>) -> Vec<(K, Sums)> {
    let mut list: Vec<(K, Sums)> = groups.into_iter().collect();
    list.sort_by(|a, b| b.1.tokens().cmp(&a.1.tokens()).then(b.1.requests.cmp(&a.1.requests)).then(a.0.cmp(&b.0)));
    list
}

/// The rollup of one range, summed four ways (by the store).
pub struct ActivityRows {
    pub by_day: Vec<UsageRow>,
    pub by_model: Vec<UsageRow>,
    pub by_key: Vec<UsageRow>,
    pub by_model_provider: Vec<UsageRow>,
}

/// Folds the rows of days `from..=to` into the activity report; every day of the range is in
/// `days`, zero when nothing happened.
pub fn activity(rows: &ActivityRows, from: i64, to: i64, names: &KeyNames) -> Activity {
    let per_day = group_by(&rows.by_day, |r| r.day);
    let days = (from..=to)
        .map(|d| DayView { date: date_of(d), sums: per_day.get(&d).copied().unwrap_or_default().view() })
        .collect();
    let per_model = group_by(&rows.by_model, |r| r.model.clone());
    let models = per_model.keys().cloned().collect();
    let top_models =
        by_tokens(per_model).into_iter().take(TOP).map(|(model, s)| ModelView { model, sums: s.view() }).collect();
    let per_key = group_by(&rows.by_key, |r| r.key_id.clone());
    let keys = per_key.keys().map(|k| key_ref(k)).collect();
    let top_keys = by_tokens(per_key)
        .into_iter()
        .take(TOP)
        .map(|(key, s)| KeyView { key_name: names.get(&key).cloned(), key_id: key_ref(&key), sums: s.view() })
        .collect();
    let providers = by_tokens(group_by(&rows.by_model_provider, |r| r.provider.clone()))
        .into_iter()
        .filter(|(p, _)| !p.is_empty())
        .map(|(provider, s)| ProviderView { provider, requests: s.requests, total_tokens: s.tokens(), cost: amount(s.cost_nanos) })
        .collect();
    let model_providers = group_by(&rows.by_model_provider, |r| (r.model.clone(), r.provider.clone()))
        .into_iter()
        .filter(|((_, p), _)| !p.is_empty())
        .map(|((model, provider), s)| ModelProviderView {
            model,
            provider,
            requests: s.requests,
            total_tokens: s.tokens(),
            cost: amount(s.cost_nanos),
        })
        .collect();
    Activity {
        from: date_of(from),
        to: date_of(to),
        timezone: String::new(),
        currency: "",
        days,
        top_models,
        top_keys,
        providers,
        model_providers,
        totals: total(&rows.by_day).view(),
        models,
        keys,
    }
}

/// One key in `GET /me/usage`.
#[derive(Serialize)]
pub struct KeyUsage {
    pub key_id: Option<String>,
    pub key_name: Option<String>,
    pub today: SumsView,
    pub last_30_days: SumsView,
}

/// `GET /me/usage`.
#[derive(Serialize)]
pub struct Usage {
    pub date: String,
    pub timezone: String,
    pub currency: &'static str,
    pub keys: Vec<KeyUsage>,
    pub totals: UsageTotals,
}

#[derive(Serialize)]
pub struct UsageTotals {
    pub today: SumsView,
    pub last_30_days: SumsView,
}

/// Per key (every key the organisation has, and any other key that has usage), today and
/// over the 30 days ending today.
pub fn usage(rows: &[UsageRow], today: i64, names: &KeyNames) -> Usage {
    let month = group_by(rows, |r| r.key_id.clone());
    let todays: Vec<UsageRow> = rows.iter().filter(|r| r.day == today).cloned().collect();
    let day = group_by(&todays, |r| r.key_id.clone());
    let mut ids: Vec<&String> = names.keys().chain(month.keys()).collect();
    ids.sort();
    ids.dedup();
    let keys = ids
        .into_iter()
        .map(|id| KeyUsage {
            key_id: key_ref(id),
            key_name: names.get(id).cloned(),
            today: day.get(id).copied().unwrap_or_default().view(),
            last_30_days: month.get(id).copied().unwrap_or_default().view(),
        })
        .collect();
    Usage {
        date: date_of(today),
        timezone: String::new(),
        currency: "",
        keys,
        totals: UsageTotals { today: total(&todays).view(), last_30_days: total(rows).view() },
    }
}

/// One (day, model) of `GET /me/usage/daily`.
#[derive(Serialize)]
pub struct DailyEntry {
    pub date: String,
    pub model: String,
    #[serde(flatten)]
    pub sums: SumsView,
}

pub fn daily(rows: &[UsageRow]) -> Vec<DailyEntry> {
    group_by(rows, |r| (r.day, r.model.clone()))
        .into_iter()
        .map(|((day, model), s)| DailyEntry { date: date_of(day), model, sums: s.view() })
        .collect()
}

/// One row of OpenRouter's `GET /v1/activity`: a day of one model on one provider.
#[derive(Serialize)]
pub struct OpenRouterActivity {
    pub date: String,
    pub model: String,
    pub model_permaslug: String,
    pub endpoint_id: String,
    pub provider_name: String,
    pub usage: Amount,
    pub byok_usage_inference: Amount,
    pub byok_requests: i64,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
}

pub fn openrouter_activity(rows: &[UsageRow]) -> Vec<OpenRouterActivity> {
    group_by(rows, |r| (r.day, r.model.clone(), r.provider.clone()))
        .into_iter()
        .rev()
        .map(|((day, model, provider), s)| OpenRouterActivity {
            date: date_of(day),
            endpoint_id: format!("{provider}:{model}"),
            model_permaslug: model.clone(),
            model,
            provider_name: provider,
            usage: amount(s.cost_nanos),
            byok_usage_inference: amount(0),
            byok_requests: s.byok_requests,
            requests: s.requests,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            reasoning_tokens: s.reasoning_tokens,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(day: i64, key: &str, model: &str, provider: &str, requests: i64, cost_nanos: i64) -> UsageRow {
        UsageRow {
            org_id: "o".into(),
            day,
            key_id: key.into(),
            model: model.into(),
            provider: provider.into(),
            requests,
            prompt_tokens: 10 * requests,
            completion_tokens: 5 * requests,
            cost_nanos,
            ..UsageRow::default()
        }
    }

    #[test]
    fn dates_round_trip_and_bad_dates_name_the_param() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(parse_date("2026-11-22", "from").unwrap(), 20_779);
        assert_eq!(date_of(20_779), "2026-11-22");
        for bad in ["2026-13-01", "2026-02-30", "26-11-22", "yesterday", "2026-11-22T00:00"] {
            let err = parse_date(bad, "from").unwrap_err();
            assert!(matches!(err, ApiError::InvalidRequest { param: Some(ref p), .. } if p == "from"), "{bad}");
        }
    }

    #[test]
    fn activity_sums_exactly_and_fills_every_day() {
        let rows = [
            row(10, "k1", "a", "p1", 2, 1),
            row(10, "k2", "b", "p2", 1, 100_000_000),
            row(12, "k1", "a", "p2", 3, 999_999_999),
        ];
        let names: KeyNames = [("k1".to_owned(), "first".to_owned())].into();
        let all = ActivityRows { by_day: rows.to_vec(), by_model: rows.to_vec(), by_key: rows.to_vec(), by_model_provider: rows.to_vec() };
        let report = activity(&all, 9, 12, &names);
        assert_eq!(report.days.len(), 4);
        assert_eq!(report.days[0].sums.requests, 0);
        assert_eq!(report.days[1].sums.requests, 3);
        assert_eq!(report.totals.requests, 6);
        assert_eq!(serde_json::to_string(&report.totals.cost).unwrap(), "1.1");
        assert_eq!(report.top_models[0].model, "a");
        assert_eq!(report.top_keys[0].key_name.as_deref(), Some("first"));
        let p2 = report.providers.iter().find(|p| p.provider == "p2").unwrap();
        assert_eq!(serde_json::to_string(&p2.cost).unwrap(), "1.099999999");
    }
}
