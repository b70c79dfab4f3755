//! Exact amounts in JSON: a decimal written as a JSON number with every digit kept (no float
//! on the way), for `/v1/credits`, key usage and costs.

use rust_decimal::Decimal;
use serde_json::value::RawValue;

/// The decimal as a raw JSON number (`12.5`, `0.00042`).
pub fn exact(amount: Decimal) -> Option<Box<RawValue>> {
    RawValue::from_string(amount.normalize().to_string()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use super::*;

    #[test]
    fn writes_every_digit() {
        let value = exact(Decimal::from_str("1234567890.123456789").unwrap());
        assert_eq!(serde_json::to_string(&value).unwrap(), "1234567890.123456789");
        assert_eq!(serde_json::to_string(&exact(Decimal::from_str("0.10").unwrap())).unwrap(), "0.1");
    }
}
