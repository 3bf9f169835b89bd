//! QEMU's `key=value` option syntax (`util/keyval.c`), turned into the JSON
//! shape QMP uses, so one options model serves both.
//!
//! * `a=1,b.c=2` → `{"a": "1", "b": {"c": "2"}}` (dotted keys nest);
//! * `list.0=x,list.1=y` → `{"list": ["x", "y"]}` (indexes make lists);
//! * `,,` is a literal comma inside a value;
//! * an optional implied key names a leading bare value
//!   (`--blockdev driver=...` has none; `--nbd-server` has none; `-o` has none).
//!
//! Values stay strings; the driver layer converts them to numbers and
//! booleans where an option needs one.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyvalError {
    #[error("Invalid parameter '{0}'")]
    InvalidKey(String),
    #[error("Expected '=' after parameter '{0}'")]
    MissingEquals(String),
    #[error("Parameter '{0}' is set more than once")]
    Duplicate(String),
    #[error("Parameter '{0}' used inconsistently")]
    Inconsistent(String),
    #[error("Parameter '{key}': list indexes must run from 0 without gaps")]
    BadList { key: String },
}

/// Parses `text`; `implied_key` names a first element given without `key=`.
pub fn parse(text: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    let mut root = Map::new();
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() {
        let (key, value, tail) = split_pair(rest, if first { implied_key } else { None })?;
        first = false;
        insert(&mut root, &key, value)?;
        rest = tail;
    }
    lists(Value::Object(root), "")
}

/// One `key=value` element: returns key, unescaped value and what follows.
fn split_pair<'a>(
    s: &'a str,
    implied: Option<&str>,
) -> Result<(String, String, &'a str), KeyvalError> {
    let key_end = s.find(['=', ',']).unwrap_or(s.len());
    let (key, after_key) = if s[key_end..].starts_with('=') {
        (s[..key_end].to_string(), &s[key_end + 1..])
    } else if let Some(k) = implied {
        (k.to_string(), s)
    } else {
        return Err(KeyvalError::MissingEquals(s[..key_end].to_string()));
    };
    if key.is_empty()
        || key.split('.').any(|seg| {
            seg.is_empty()
                || !seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
    {
        return Err(KeyvalError::InvalidKey(key));
    }
    let mut value = String::new();
    let mut chars = after_key.char_indices().peekable();
    let mut consumed = after_key.len();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if matches!(chars.peek(), Some((_, ','))) {
                chars.next();
                value.push(',');
                continue;
            }
            consumed = i + 1;
            break;
        }
        value.push(c);
    }
    Ok((key, value, &after_key[consumed..]))
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), KeyvalError> {
    let mut segs = key.split('.').peekable();
    let mut cur = root;
    while let Some(seg) = segs.next() {
        if segs.peek().is_none() {
            if cur.contains_key(seg) {
                return Err(if cur[seg].is_object() {
                    KeyvalError::Inconsistent(key.to_string())
                } else {
                    KeyvalError::Duplicate(key.to_string())
                });
            }
            cur.insert(seg.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = cur
            .entry(seg.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = entry
            .as_object_mut()
            .ok_or_else(|| KeyvalError::Inconsistent(key.to_string()))?;
    }
    Ok(())
}

/// Turns objects whose keys are all decimal indexes into lists.
fn lists(v: Value, path: &str) -> Result<Value, KeyvalError> {
    let Value::Object(map) = v else { return Ok(v) };
    let numeric = !map.is_empty() && map.keys().all(|k| k.chars().all(|c| c.is_ascii_digit()));
    if numeric {
        let mut items: Vec<(usize, Value)> = Vec::new();
        for (k, v) in map {
            let i = k.parse::<usize>().map_err(|_| KeyvalError::BadList {
                key: path.to_string(),
            })?;
            items.push((i, lists(v, &format!("{path}.{k}"))?));
        }
        items.sort_by_key(|(i, _)| *i);
        if items
            .iter()
            .enumerate()
            .any(|(want, (got, _))| want != *got)
        {
            return Err(KeyvalError::BadList {
                key: path.trim_start_matches('.').to_string(),
            });
        }
        return Ok(Value::Array(items.into_iter().map(|(_, v)| v).collect()));
    }
    let mut out = Map::new();
    for (k, v) in map {
        let child = lists(v, &format!("{path}.{k}"))?;
        out.insert(k, child);
    }
    Ok(Value::Object(out))
}

/// Merges the options `src` into `dst`, key by key and objects
/// recursively; `src` wins where both give a value (what `--image-opts`
/// and `-o` overrides do to a filename's options).
pub fn merge(dst: &mut Value, src: Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                match d.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        d.insert(k, v);
                    }
                }
            }
        }
        (d, s) => *d = s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nests_dotted_keys_and_builds_lists() {
        let v = parse("driver=raw,file.driver=file,file.filename=/tmp/a,,b.img,inject-error.0.event=read_aio,inject-error.1.event=write_aio", None).unwrap();
        assert_eq!(
            v,
            json!({"driver": "raw", "file": {"driver": "file", "filename": "/tmp/a,b.img"},
                   "inject-error": [{"event": "read_aio"}, {"event": "write_aio"}]})
        );
    }

    #[test]
    fn implied_key_names_a_leading_value() {
        assert_eq!(
            parse("qcow2,size=1", Some("driver")).unwrap(),
            json!({"driver": "qcow2", "size": "1"})
        );
    }

    #[test]
    fn errors_are_clear() {
        assert_eq!(
            parse("driver", None),
            Err(KeyvalError::MissingEquals("driver".into()))
        );
        assert_eq!(
            parse("a=1,a=2", None),
            Err(KeyvalError::Duplicate("a".into()))
        );
        assert_eq!(
            parse("a=1,a.b=2", None),
            Err(KeyvalError::Inconsistent("a.b".into()))
        );
        assert_eq!(
            parse("a..b=1", None),
            Err(KeyvalError::InvalidKey("a..b".into()))
        );
        assert!(matches!(
            parse("l.0=a,l.2=b", None),
            Err(KeyvalError::BadList { .. })
        ));
    }
}
