//! Whole numbers as JSON Schema counts them: `412` and `412.0` are the same
//! integer, so request fields typed `integer` in the OpenAPI document take
//! both (as OpenAI's own API does). A fraction, or a number out of the
//! field's range, is still refused.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

/// An integer field read leniently; `.0` is the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole<T>(pub T);

impl<'de, T: TryFrom<i64> + TryFrom<u64>> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WholeVisitor(PhantomData))
    }
}

struct WholeVisitor<T>(PhantomData<T>);

impl<'de, T: TryFrom<i64> + TryFrom<u64>> Visitor<'de> for WholeVisitor<T> {
    type Value = Whole<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a whole number in range")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Whole<T>, E> {
        T::try_from(v)
            .map(Whole)
            .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Whole<T>, E> {
        T::try_from(v)
            .map(Whole)
            .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Whole<T>, E> {
        // Past ±2^63 no f64 is exactly an i64 or u64 worth taking.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        if v.fract() != 0.0 || !(-LIMIT..LIMIT).contains(&v) {
            return Err(E::invalid_value(Unexpected::Float(v), &self));
        }
        T::try_from(v as i64)
            .map(Whole)
            .map_err(|_| E::invalid_value(Unexpected::Float(v), &self))
    }
}

/// `#[serde(default, deserialize_with = "strata_core::whole::opt")]` for an
/// optional integer field.
pub fn opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    Option::<Whole<T>>::deserialize(d).map(|o| o.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct Limits {
        #[serde(default, deserialize_with = "opt")]
        per_minute: Option<u32>,
        #[serde(default, deserialize_with = "opt")]
        seed: Option<i64>,
    }

    fn parse(json: &str) -> Result<Limits, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn integers_written_with_a_zero_fraction_are_integers() {
        let l = parse(r#"{"per_minute": 412.0, "seed": -3.0}"#).unwrap();
        assert_eq!((l.per_minute, l.seed), (Some(412), Some(-3)));
        let l = parse(r#"{"per_minute": 412, "seed": null}"#).unwrap();
        assert_eq!((l.per_minute, l.seed), (Some(412), None));
        assert_eq!(parse("{}").unwrap().per_minute, None);
    }

    #[test]
    fn fractions_out_of_range_numbers_and_other_types_are_refused() {
        for bad in [
            r#"{"per_minute": 1.5}"#,
            r#"{"per_minute": -1}"#,
            r#"{"per_minute": -1.0}"#,
            r#"{"per_minute": 4294967296}"#,
            r#"{"per_minute": 1e300}"#,
            r#"{"per_minute": "5"}"#,
            r#"{"per_minute": true}"#,
            r#"{"seed": 9.3e18}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("expected a whole number in range"), "{bad}: {e}");
        }
    }
}
