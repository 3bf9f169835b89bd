//! JSON as qemu-img prints it (QEMU's `qobject_to_json_pretty`): keys in
//! the order given, four-space indents, empty containers on two lines.
//! serde_json's `Map` sorts keys, so output keeps its own order here.

use std::fmt::Write;

/// A JSON value whose objects keep their key order.
#[derive(Clone, Debug, PartialEq)]
pub enum J {
    Obj(Vec<(String, J)>),
    Arr(Vec<J>),
    Str(String),
    Int(i64),
    Bool(bool),
}

impl J {
    pub fn obj() -> J {
        J::Obj(Vec::new())
    }

    /// Appends `key: value` to an object (no-op on other kinds).
    pub fn set(&mut self, key: &str, value: J) {
        if let J::Obj(v) = self {
            v.push((key.to_string(), value));
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<J>) -> J {
        self.set(key, value.into());
        self
    }

    /// The pretty form, without a trailing newline.
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write_pretty(&mut s, 0);
        s
    }

    fn write_pretty(&self, s: &mut String, indent: usize) {
        let pad = |s: &mut String, n: usize| s.extend(std::iter::repeat_n(' ', n * 4));
        match self {
            J::Obj(items) => {
                s.push_str("{\n");
                for (i, (k, v)) in items.iter().enumerate() {
                    pad(s, indent + 1);
                    write_str(s, k);
                    s.push_str(": ");
                    v.write_pretty(s, indent + 1);
                    if i + 1 < items.len() {
                        s.push(',');
                    }
                    s.push('\n');
                }
                pad(s, indent);
                s.push('}');
            }
            J::Arr(items) => {
                s.push_str("[\n");
                for (i, v) in items.iter().enumerate() {
                    pad(s, indent + 1);
                    v.write_pretty(s, indent + 1);
                    if i + 1 < items.len() {
                        s.push(',');
                    }
                    s.push('\n');
                }
                pad(s, indent);
                s.push(']');
            }
            other => other.write_compact(s),
        }
    }

    /// The one-line form qemu-img uses for `map` and `measure` entries:
    /// `{ "a": 1, "b": 2}`.
    pub fn compact(&self) -> String {
        let mut s = String::new();
        self.write_compact(&mut s);
        s
    }

    fn write_compact(&self, s: &mut String) {
        match self {
            J::Obj(items) => {
                s.push('{');
                for (i, (k, v)) in items.iter().enumerate() {
                    s.push_str(if i == 0 { " " } else { ", " });
                    write_str(s, k);
                    s.push_str(": ");
                    v.write_compact(s);
                }
                s.push('}');
            }
            J::Arr(items) => {
                s.push('[');
                for (i, v) in items.iter().enumerate() {
                    s.push_str(if i == 0 { " " } else { ", " });
                    v.write_compact(s);
                }
                s.push(']');
            }
            J::Str(t) => write_str(s, t),
            J::Int(n) => {
                let _ = write!(s, "{n}");
            }
            J::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        }
    }
}

/// A JSON string as QEMU writes it: control characters and non-ASCII
/// escaped as `\uXXXX`.
fn write_str(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(s, "\\u{u:04X}");
                }
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

impl From<&str> for J {
    fn from(v: &str) -> J {
        J::Str(v.to_string())
    }
}
impl From<String> for J {
    fn from(v: String) -> J {
        J::Str(v)
    }
}
impl From<bool> for J {
    fn from(v: bool) -> J {
        J::Bool(v)
    }
}
impl From<u64> for J {
    fn from(v: u64) -> J {
        J::Int(v as i64)
    }
}
impl From<i64> for J {
    fn from(v: i64) -> J {
        J::Int(v)
    }
}
impl From<u32> for J {
    fn from(v: u32) -> J {
        J::Int(i64::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_matches_qemu_layout() {
        let j = J::obj()
            .with("children", J::Arr(vec![]))
            .with("data", J::obj())
            .with("n", 5u64)
            .with("s", "a\"b");
        assert_eq!(
            j.pretty(),
            "{\n    \"children\": [\n    ],\n    \"data\": {\n    },\n    \"n\": 5,\n    \"s\": \"a\\\"b\"\n}"
        );
        assert_eq!(
            J::obj().with("a", 1u64).with("b", true).compact(),
            "{ \"a\": 1, \"b\": true}"
        );
    }
}
