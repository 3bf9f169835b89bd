//! Deserialising driver options that may come from the command line.
//!
//! Options written as `key=value` (`--blockdev`, `--image-opts`) arrive as
//! strings; QEMU's keyval visitor converts them to the type each option
//! wants. [`Lenient`] does the same for serde: a string is accepted where a
//! number or boolean is expected (`"4096"`, `"on"`), everything else is
//! deserialised exactly as from JSON.

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::{Error, Value};

/// A JSON value whose strings convert to numbers and booleans on demand.
pub struct Lenient(pub Value);

impl<'de> IntoDeserializer<'de, Error> for Lenient {
    type Deserializer = Lenient;
    fn into_deserializer(self) -> Lenient {
        self
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

macro_rules! lenient_number {
    ($($method:ident => $visit:ident : $ty:ty),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                match self.0 {
                    Value::String(s) => match s.trim().parse::<$ty>() {
                        Ok(n) => visitor.$visit(n),
                        Err(_) => Err(de::Error::invalid_value(de::Unexpected::Str(&s), &visitor)),
                    },
                    other => de::Deserializer::$method(other, visitor),
                }
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Lenient {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Object(map) => visitor.visit_map(MapDeserializer::new(
                map.into_iter().map(|(k, v)| (k, Lenient(v))),
            )),
            Value::Array(list) => {
                visitor.visit_seq(SeqDeserializer::new(list.into_iter().map(Lenient)))
            }
            other => other.deserialize_any(visitor),
        }
    }

    /// Sizes may carry QEMU's suffixes (`size=1M`), as QAPI `size` options do.
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => match crate::size::parse_size(s.trim()) {
                Ok(n) => visitor.visit_u64(n),
                Err(_) => Err(de::Error::invalid_value(de::Unexpected::Str(&s), &visitor)),
            },
            other => de::Deserializer::deserialize_u64(other, visitor),
        }
    }

    lenient_number! {
        deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32,
        deserialize_i8 => visit_i8: i8,
        deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32,
        deserialize_i64 => visit_i64: i64,
        deserialize_f64 => visit_f64: f64,
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => match parse_bool(&s) {
                Some(b) => visitor.visit_bool(b),
                None => Err(de::Error::invalid_value(de::Unexpected::Str(&s), &visitor)),
            },
            other => de::Deserializer::deserialize_bool(other, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(Lenient(other)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        f32 char str string bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any i128 u128
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Opts {
        size: u64,
        read_zeroes: Option<bool>,
        name: String,
        list: Vec<u32>,
    }

    #[test]
    fn strings_become_numbers_and_booleans() {
        let v = serde_json::json!({"size": "4096", "read-zeroes": "on", "name": "123", "list": ["1", 2]});
        let o = Opts::deserialize(Lenient(v)).unwrap();
        assert_eq!(o.size, 4096);
        let v = serde_json::json!({"size": "1M", "name": "x", "list": []});
        assert_eq!(Opts::deserialize(Lenient(v)).unwrap().size, 1 << 20);
        assert_eq!(o.read_zeroes, Some(true));
        assert_eq!(o.name, "123");
        assert_eq!(o.list, vec![1, 2]);
    }

    #[test]
    fn bad_values_and_unknown_keys_are_errors() {
        let e = Opts::deserialize(Lenient(
            serde_json::json!({"size": "big", "name": "x", "list": []}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("big"), "{e}");
        let e = Opts::deserialize(Lenient(
            serde_json::json!({"size": 1, "name": "x", "list": [], "bogus": 1}),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
    }
}
