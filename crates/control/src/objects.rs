//! QOM objects a user creates: `--object` on the command line and QMP's
//! `object-add`, `object-del`, `qom-get` and `qom-set`, with QEMU's
//! argument checks and messages. The one type so far is `throttle-group`,
//! whose groups live in `sluice_drivers::filter::throttle`'s registry (the
//! `throttle` driver finds them there by id).

use crate::qmp::{self, BoxFuture, Qmp, QmpError};
use serde_json::{json, Map, Value};
use sluice_drivers::filter::throttle::{self, RemoveError, ThrottleConfig};
use std::sync::Arc;

/// The object types `object-add` knows.
pub const TYPES: &[&str] = &["throttle-group"];

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

fn take_string(args: &mut Map<String, Value>, key: &str) -> Result<String, QmpError> {
    qmp::take_string(args, key)?
        .ok_or_else(|| QmpError::generic(format!("Parameter '{key}' is missing")))
}

/// Creates an object from `object-add` arguments, or from `--object`
/// options (`strings`: values are text, as the command line gives them).
pub fn object_add(mut args: Map<String, Value>, strings: bool) -> Result<(), QmpError> {
    let ty = take_string(&mut args, "qom-type")?;
    if !TYPES.contains(&ty.as_str()) {
        return Err(QmpError::generic(format!(
            "Parameter 'qom-type' does not accept value '{ty}'"
        )));
    }
    let id = take_string(&mut args, "id")?;
    if !id_wellformed(&id) {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    let limits = match args.remove("limits") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'limits', expected: object",
            ))
        }
    };
    // Properties are set first (QEMU's order among them follows its hash
    // table; here the legacy ones go before `limits`, which is checked as
    // a whole), then the object is added under its id, then checked.
    let mut cfg = ThrottleConfig::default();
    for (key, v) in &args {
        if !cfg.set_legacy(key, v, strings).map_err(QmpError::generic)? {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
    }
    if let Some(l) = &limits {
        cfg.apply_limits(l, "limits.", strings)
            .map_err(QmpError::generic)?;
    }
    let duplicate = || {
        QmpError::generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        ))
    };
    if throttle::find_group(&id).is_some() {
        return Err(duplicate());
    }
    cfg.validate().map_err(QmpError::generic)?;
    throttle::create_group(&id, cfg).ok_or_else(duplicate)?;
    Ok(())
}

/// Deletes object `id`, unless a node uses it.
pub fn object_del(id: &str) -> Result<(), QmpError> {
    throttle::remove_group(id).map_err(|e| match e {
        RemoveError::NotFound => QmpError::generic(format!("object '{id}' not found")),
        RemoveError::InUse => {
            QmpError::generic(format!("object '{id}' is in use, can not be deleted"))
        }
    })
}

/// The group a QOM path names: `/objects/ID`, or `ID` alone (a partial
/// path, which QEMU resolves when it is unambiguous).
fn resolve(path: &str) -> Result<Arc<throttle::ThrottleGroup>, QmpError> {
    let id = path.strip_prefix("/objects/").unwrap_or(path);
    throttle::find_group(id)
        .ok_or_else(|| QmpError::device_not_found(format!("Device '{path}' not found")))
}

fn not_found(property: &str) -> QmpError {
    QmpError::generic(format!("Property 'throttle-group.{property}' not found"))
}

pub fn qom_get(path: &str, property: &str) -> Result<Value, QmpError> {
    let g = resolve(path)?;
    let cfg = g.config();
    match property {
        "type" => Ok(json!("throttle-group")),
        "limits" => Ok(cfg.to_limits()),
        p => cfg
            .get_legacy(p)
            .map(Value::from)
            .ok_or_else(|| not_found(p)),
    }
}

pub fn qom_set(path: &str, property: &str, value: Value) -> Result<(), QmpError> {
    let g = resolve(path)?;
    let mut cfg = g.config();
    match property {
        "limits" => {
            let Value::Object(l) = value else {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'limits', expected: object",
                ));
            };
            cfg.apply_limits(&l, "limits.", false)
                .map_err(QmpError::generic)?;
            g.set_config(cfg);
            Ok(())
        }
        "type" => Err(QmpError::generic(
            "Property 'throttle-group.type' is not writable",
        )),
        // The legacy properties are fixed once the object is complete:
        // limits must change together, as some combinations are invalid.
        p if cfg.get_legacy(p).is_some() => Err(QmpError::generic(
            "Property cannot be set after initialization",
        )),
        p => Err(not_found(p)),
    }
}

/// The QMP commands on objects.
#[derive(Default)]
pub struct ObjectCommands;

impl ObjectCommands {
    pub fn new() -> Arc<ObjectCommands> {
        Arc::new(ObjectCommands)
    }

    fn run(&self, name: &str, mut args: Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "object-add" => object_add(args, false)?,
            "object-del" => {
                let id = take_string(&mut args, "id")?;
                qmp::no_args(&args)?;
                object_del(&id)?;
            }
            "qom-get" => {
                let path = take_string(&mut args, "path")?;
                let property = take_string(&mut args, "property")?;
                qmp::no_args(&args)?;
                return qom_get(&path, &property);
            }
            "qom-set" => {
                let path = take_string(&mut args, "path")?;
                let property = take_string(&mut args, "property")?;
                let value = args
                    .remove("value")
                    .ok_or_else(|| QmpError::generic("Parameter 'value' is missing"))?;
                qmp::no_args(&args)?;
                qom_set(&path, &property, value)?;
            }
            _ => {
                return Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                )))
            }
        }
        Ok(json!({}))
    }
}

impl qmp::Extension for ObjectCommands {
    fn commands(&self) -> Vec<&'static str> {
        vec!["object-add", "object-del", "qom-get", "qom-set"]
    }

    fn execute<'a>(
        &'a self,
        _qmp: &'a Qmp,
        name: &'a str,
        args: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, QmpError>> {
        Box::pin(async move { self.run(name, args) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn object_add_checks_as_qemu_does() {
        let add = |v: Value| object_add(args(v), false).map_err(|e| e.desc);
        assert_eq!(
            add(json!({"qom-type": "nope", "id": "x"})).unwrap_err(),
            "Parameter 'qom-type' does not accept value 'nope'"
        );
        assert_eq!(
            add(json!({"id": "x"})).unwrap_err(),
            "Parameter 'qom-type' is missing"
        );
        assert_eq!(
            add(json!({"qom-type": "throttle-group", "id": "1x"})).unwrap_err(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            add(json!({"qom-type": "throttle-group", "id": "objs-a", "x-iops-total": -7}))
                .unwrap_err(),
            "Property values cannot be negative"
        );
        add(json!({"qom-type": "throttle-group", "id": "objs-a", "x-iops-total": 9})).unwrap();
        assert_eq!(
            add(json!({"qom-type": "throttle-group", "id": "objs-a"})).unwrap_err(),
            "attempt to add duplicate property 'objs-a' to object (type 'container')"
        );
        assert_eq!(qom_get("objs-a", "x-iops-total").unwrap(), json!(9));
        qom_set("/objects/objs-a", "limits", json!({"bps-total": 1000})).unwrap();
        let l = qom_get("objs-a", "limits").unwrap();
        assert_eq!(
            (l["iops-total"].clone(), l["bps-total"].clone()),
            (json!(9), json!(1000))
        );
        assert_eq!(
            qom_set("objs-a", "x-iops-total", json!(3))
                .unwrap_err()
                .desc,
            "Property cannot be set after initialization"
        );
        assert_eq!(
            qom_get("objs-nope", "limits").unwrap_err().class,
            "DeviceNotFound"
        );
        object_del("objs-a").unwrap();
        assert_eq!(
            object_del("objs-a").unwrap_err().desc,
            "object 'objs-a' not found"
        );
    }

    #[test]
    fn command_line_values_are_text() {
        let v = crate::keyval::parse(
            "throttle-group,id=objs-cli,limits.iops-total=0x10,x-bps-total=5",
            Some("qom-type"),
        )
        .unwrap();
        object_add(args(v), true).unwrap();
        assert_eq!(qom_get("objs-cli", "x-iops-total").unwrap(), json!(16));
        let v = crate::keyval::parse(
            "throttle-group,id=objs-bad,limits.iops-total=x",
            Some("qom-type"),
        )
        .unwrap();
        assert_eq!(
            object_add(args(v), true).unwrap_err().desc,
            "Parameter 'limits.iops-total' expects integer"
        );
        object_del("objs-cli").unwrap();
    }
}
