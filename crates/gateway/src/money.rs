//! Exact money: decimal amounts with a currency, token prices per million tokens, and FX.
//! No floats anywhere: every amount is a `rust_decimal::Decimal`.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Currency {
    #[serde(rename = "USD")]
    Usd,
    #[serde(rename = "INR")]
    Inr,
}

impl Currency {
    pub fn code(self) -> &'static str {
        match self {
            Currency::Usd => "USD",
            Currency::Inr => "INR",
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "USD" => Ok(Currency::Usd),
            "INR" => Ok(Currency::Inr),
            other => Err(format!("unknown currency `{other}` (expected USD or INR)")),
        }
    }
}

/// An exact amount of one currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Money {
    pub amount: Decimal,
    pub currency: Currency,
}

impl Money {
    pub fn zero(currency: Currency) -> Self {
        Money { amount: Decimal::ZERO, currency }
    }
}

/// A route's token prices, per million tokens, in one currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPrice {
    pub input_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    /// Price of prompt tokens served from the provider's cache (defaults to the input price).
    pub cached_input_per_mtok: Decimal,
    pub currency: Currency,
}

/// Tokens one request used, as billed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: u64,
    pub completion: u64,
    /// The part of `prompt` served from cache.
    pub cached: u64,
}

const MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

impl TokenPrice {
    /// `tokens × price`, exact.
    pub fn cost(&self, tokens: TokenCounts) -> Money {
        let cached = tokens.cached.min(tokens.prompt);
        let uncached = tokens.prompt - cached;
        let amount = (Decimal::from(uncached) * self.input_per_mtok
            + Decimal::from(cached) * self.cached_input_per_mtok
            + Decimal::from(tokens.completion) * self.output_per_mtok)
            / MILLION;
        Money { amount: amount.normalize(), currency: self.currency }
    }

    /// Input plus output price, for ordering routes by price in one currency.
    pub fn combined_per_mtok(&self, fx: &Fx) -> Decimal {
        fx.to_usd(Money { amount: self.input_per_mtok + self.output_per_mtok, currency: self.currency })
    }
}

/// The configured exchange rate between USD and INR, dated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fx {
    /// Rupees per dollar.
    pub inr_per_usd: Decimal,
    /// The date the rate was taken (ISO 8601), shown wherever a converted amount is.
    pub as_of: String,
}

impl Fx {
    pub fn convert(&self, money: Money, to: Currency) -> Money {
        let amount = match (money.currency, to) {
            (a, b) if a == b => money.amount,
            (Currency::Usd, Currency::Inr) => money.amount * self.inr_per_usd,
            (Currency::Inr, Currency::Usd) => money.amount / self.inr_per_usd,
            _ => money.amount,
        };
        Money { amount: amount.normalize(), currency: to }
    }

    pub fn to_usd(&self, money: Money) -> Decimal {
        self.convert(money, Currency::Usd).amount
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn cost_is_exact_for_sub_micro_prices() {
        let price = TokenPrice {
            input_per_mtok: d("0.15"),
            output_per_mtok: d("0.60"),
            cached_input_per_mtok: d("0.075"),
            currency: Currency::Usd,
        };
        let one = price.cost(TokenCounts { prompt: 1, completion: 0, cached: 0 });
        assert_eq!(one.amount, d("0.00000015"));
        let mixed = price.cost(TokenCounts { prompt: 1000, completion: 500, cached: 400 });
        // 600 × 0.15 + 400 × 0.075 + 500 × 0.60 = 90 + 30 + 300 = 420 per million.
        assert_eq!(mixed.amount, d("0.00042"));
        let mut sum = Decimal::ZERO;
        for _ in 0..1_000_000 {
            sum += one.amount;
        }
        assert_eq!(sum, d("0.15"));
    }

    #[test]
    fn fx_converts_both_ways_exactly() {
        let fx = Fx { inr_per_usd: d("88.50"), as_of: "2026-11-01".into() };
        let inr = fx.convert(Money { amount: d("2"), currency: Currency::Usd }, Currency::Inr);
        assert_eq!(inr.amount, d("177"));
        let usd = fx.convert(inr, Currency::Usd);
        assert_eq!(usd.amount, d("2"));
    }
}

/// Nanos (10⁻⁹) of a currency unit in one unit.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// An amount in nanos, rounded up (a charge is never rounded in the payer's favour below
/// what was used… nor more than one nano above it).
pub fn decimal_to_nanos_ceil(amount: Decimal) -> i64 {
    use rust_decimal::prelude::ToPrimitive;
    (amount * Decimal::from(NANOS_PER_UNIT)).ceil().to_i64().unwrap_or(i64::MAX)
}

/// A decimal string a client typed (`"12.50"`), in nanos; refuses more than 9 decimals.
pub fn parse_nanos(text: &str) -> Option<i64> {
    use rust_decimal::prelude::ToPrimitive;
    let amount: Decimal = text.trim().parse().ok()?;
    (amount.scale() <= 9).then(|| (amount * Decimal::from(NANOS_PER_UNIT)).to_i64()).flatten()
}

/// Nanos back to an exact decimal of units.
pub fn nanos_to_decimal(nanos: i64) -> Decimal {
    Decimal::from_i128_with_scale(i128::from(nanos), 9).normalize()
}

#[cfg(test)]
mod nanos_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nanos_round_trip_and_round_up() {
        assert_eq!(parse_nanos("12.5"), Some(12_500_000_000));
        assert_eq!(parse_nanos("0.000000001"), Some(1));
        assert_eq!(parse_nanos("0.0000000001"), None);
        assert_eq!(nanos_to_decimal(12_500_000_000).to_string(), "12.5");
        assert_eq!(decimal_to_nanos_ceil(Decimal::from_str("0.00000000015").unwrap()), 1);
        assert_eq!(decimal_to_nanos_ceil(Decimal::from_str("0.00042").unwrap()), 420_000);
    }
}
