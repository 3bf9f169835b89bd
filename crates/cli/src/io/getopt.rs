//! A small glibc-style `getopt`/`getopt_long`, so that options and
//! arguments are taken exactly as qemu-io takes them: clustered short
//! options (`-qv`), attached or separate values (`-P1`, `-P 1`), options
//! after operands (glibc permutes), `--` ending the options.

/// One long option: name, whether it takes a value, and the short option
/// (or a private code above 255) it stands for.
pub struct LongOpt {
    pub name: &'static str,
    pub has_arg: bool,
    pub code: u32,
}

/// What went wrong, with the message glibc prints (`PROG: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetoptError(pub String);

/// Options in the order given, the operands, and the first error (after
/// which nothing more was parsed).
#[derive(Debug, Default)]
pub struct Parsed {
    pub opts: Vec<(u32, Option<String>)>,
    pub operands: Vec<String>,
    pub error: Option<GetoptError>,
}

fn short_spec(optstring: &str, c: char) -> Option<bool> {
    let mut it = optstring.chars().peekable();
    while let Some(o) = it.next() {
        let takes = it.peek() == Some(&':');
        if takes {
            it.next();
        }
        if o == c && c != ':' {
            return Some(takes);
        }
    }
    None
}

/// Parses `args` (without the program or command name) for `prog`.
pub fn getopt(prog: &str, args: &[String], optstring: &str, longopts: &[LongOpt]) -> Parsed {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            p.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let matches: Vec<&LongOpt> = longopts
                .iter()
                .filter(|l| l.name.starts_with(name))
                .collect();
            let lo = matches
                .iter()
                .find(|l| l.name == name)
                .copied()
                .or(if matches.len() == 1 {
                    Some(matches[0])
                } else {
                    None
                });
            let Some(lo) = lo else {
                p.error = Some(GetoptError(if matches.is_empty() {
                    format!("{prog}: unrecognized option '--{name}'")
                } else {
                    format!("{prog}: option '--{name}' is ambiguous")
                }));
                return p;
            };
            if lo.has_arg {
                let v = match inline {
                    Some(v) => v,
                    None if i < args.len() => {
                        i += 1;
                        args[i - 1].clone()
                    }
                    None => {
                        p.error = Some(GetoptError(format!(
                            "{prog}: option '--{}' requires an argument",
                            lo.name
                        )));
                        return p;
                    }
                };
                p.opts.push((lo.code, Some(v)));
            } else if inline.is_some() {
                p.error = Some(GetoptError(format!(
                    "{prog}: option '--{}' doesn't allow an argument",
                    lo.name
                )));
                return p;
            } else {
                p.opts.push((lo.code, None));
            }
            continue;
        }
        if a.len() < 2 || !a.starts_with('-') {
            p.operands.push(a.clone());
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            match short_spec(optstring, c) {
                None => {
                    p.error = Some(GetoptError(format!("{prog}: invalid option -- '{c}'")));
                    return p;
                }
                Some(false) => p.opts.push((c as u32, None)),
                Some(true) => {
                    let v = if j < chars.len() {
                        let v: String = chars[j..].iter().collect();
                        j = chars.len();
                        v
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        p.error = Some(GetoptError(format!(
                            "{prog}: option requires an argument -- '{c}'"
                        )));
                        return p;
                    };
                    p.opts.push((c as u32, Some(v)));
                }
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn permutes_clusters_and_takes_values() {
        let p = getopt("read", &v(&["0", "-qP", "5", "512", "-v"]), "P:qv", &[]);
        assert_eq!(
            p.opts,
            vec![
                ('q' as u32, None),
                ('P' as u32, Some("5".into())),
                ('v' as u32, None)
            ]
        );
        assert_eq!(p.operands, v(&["0", "512"]));
        assert!(p.error.is_none());
    }

    #[test]
    fn reports_errors_like_glibc() {
        let p = getopt("write", &v(&["1024", "-1"]), "P:q", &[]);
        assert_eq!(p.error.unwrap().0, "write: invalid option -- '1'");
        let p = getopt("read", &v(&["-P"]), "P:", &[]);
        assert_eq!(
            p.error.unwrap().0,
            "read: option requires an argument -- 'P'"
        );
        let long = [LongOpt {
            name: "cmd",
            has_arg: true,
            code: 'c' as u32,
        }];
        let p = getopt(
            "qemu-io",
            &v(&["--cmd=read 0 1", "--cm", "x", "f"]),
            "c:",
            &long,
        );
        assert_eq!(p.opts.len(), 2);
        assert_eq!(p.operands, v(&["f"]));
    }
}
