//! `${VAR}` references in config strings, resolved from the environment.

/// The names of every `${VAR}` in `s`, in order.
#[cfg(test)]
pub fn references(s: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        names.push(&after[..end]);
        rest = &after[end + 1..];
    }
    names
}

/// `s` with every `${VAR}` replaced by the variable's value, or the first unset name.
pub fn expand(s: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        let value = lookup(name).filter(|v| !v.is_empty()).ok_or_else(|| name.to_owned())?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands every string inside a TOML value; on an unset variable returns `(key path, name)`.
pub fn expand_value(
    value: &mut toml::Value,
    path: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => {
            *s = expand(s, lookup).map_err(|name| (path.to_owned(), name))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{path}[{i}]"), lookup)?;
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                expand_value(item, &format!("{path}.{key}"), lookup)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_owned())
    }

    #[test]
    fn expands_set_variables_and_names_unset_ones() {
        assert_eq!(expand("a-${SET}-b", &env), Ok("a-value-b".to_owned()));
        assert_eq!(expand("${UNSET}", &env), Err("UNSET".to_owned()));
        assert_eq!(expand("no refs", &env), Ok("no refs".to_owned()));
        assert_eq!(expand("${open", &env), Ok("${open".to_owned()));
        assert_eq!(references("${A} and ${B}"), vec!["A", "B"]);
    }
}
