//! A small command-line parser: `--name value` / `--name=value` options,
//! a few boolean switches, positional words, and the words after `--`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

/// Options that take no value.
const SWITCHES: &[&str] = &[
    "host-network",
    "pod-network",
    "pod-privileged",
    "tty",
    "stdin",
    "verbose",
    "privileged",
    "help",
];

/// Switches that take a value after one command: (command, option), as in
/// `exec --stdin FILE`. The command is the first positional word.
const VALUE_AFTER: &[(&str, &str)] = &[("exec", "stdin")];

/// One subcommand's arguments, consumed by its handler; whatever it leaves
/// unread is an error ([`Args::finish`]).
#[derive(Debug, Default)]
pub struct Args {
    /// `--name` → every value given for it, in order (switches get "").
    options: BTreeMap<String, Vec<String>>,
    /// Words that are not options, before any `--`.
    positional: Vec<String>,
    /// The words after `--` (a command line), if there was a `--`.
    pub command: Vec<String>,
}

impl Args {
    pub fn parse(words: &[String]) -> Result<Args> {
        let mut args = Args::default();
        let mut words = words.iter();
        while let Some(word) = words.next() {
            if word == "--" {
                args.command = words.by_ref().cloned().collect();
                break;
            }
            let Some(option) = word.strip_prefix("--") else {
                args.positional.push(word.clone());
                continue;
            };
            let (name, value) = match option.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None if SWITCHES.contains(&option) && !args.takes_value(option) => {
                    (option.to_string(), String::new())
                }
                None => {
                    let value = words
                        .next()
                        .with_context(|| format!("--{option} needs a value"))?;
                    (option.to_string(), value.clone())
                }
            };
            args.options.entry(name).or_default().push(value);
        }
        Ok(args)
    }

    /// Whether `--option`, a switch elsewhere, takes a value after the
    /// command read so far ([`VALUE_AFTER`]).
    fn takes_value(&self, option: &str) -> bool {
        let command = self.positional.first().map(String::as_str);
        VALUE_AFTER.contains(&(command.unwrap_or_default(), option))
    }

    /// The last value of `--name`, if given.
    pub fn value(&mut self, name: &str) -> Option<String> {
        self.options.remove(name).and_then(|mut v| v.pop())
    }

    /// Every value of `--name` (a repeatable option).
    pub fn values(&mut self, name: &str) -> Vec<String> {
        self.options.remove(name).unwrap_or_default()
    }

    /// Whether the switch `--name` was given.
    pub fn switch(&mut self, name: &str) -> bool {
        self.options.remove(name).is_some()
    }

    /// `--name` parsed as a number, or `default`.
    pub fn number<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.value(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|e| anyhow::anyhow!("--{name} {text:?}: {e}")),
        }
    }

    /// `KEY=VALUE` pairs of a repeatable option.
    pub fn pairs(&mut self, name: &str) -> Result<Vec<(String, String)>> {
        self.values(name)
            .into_iter()
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => bail!("--{name} {pair:?}: expected KEY=VALUE"),
            })
            .collect()
    }

    /// The next positional word, which must be there.
    pub fn positional(&mut self, what: &str) -> Result<String> {
        if self.positional.is_empty() {
            bail!("missing {what}");
        }
        Ok(self.positional.remove(0))
    }

    /// Fails on anything the handler did not read.
    pub fn finish(self) -> Result<()> {
        if let Some(name) = self.options.keys().next() {
            bail!("unknown option --{name}");
        }
        if !self.positional.is_empty() {
            bail!("unexpected arguments: {:?}", self.positional);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_options_switches_positionals_and_command() {
        let mut args =
            Args::parse(&words("pod1 --name a --env A=1 --env=B=2 --tty -- sh -c x")).unwrap();
        assert_eq!(args.positional("pod").unwrap(), "pod1");
        assert_eq!(args.value("name").as_deref(), Some("a"));
        assert_eq!(
            args.pairs("env").unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert!(args.switch("tty"));
        assert!(!args.switch("stdin"));
        assert_eq!(args.command, words("sh -c x"));
        args.finish().unwrap();
    }

    #[test]
    fn stdin_takes_a_value_after_exec_only() {
        let mut args = Args::parse(&words("exec --tty --stdin in c1 -- cat")).unwrap();
        assert_eq!(args.positional("command").unwrap(), "exec");
        assert!(args.switch("tty"));
        assert_eq!(args.value("stdin").as_deref(), Some("in"));
        assert_eq!(args.positional("id").unwrap(), "c1");
        args.finish().unwrap();
        let mut args = Args::parse(&words("create pod --stdin --name n")).unwrap();
        assert!(args.switch("stdin"));
        assert_eq!(args.value("name").as_deref(), Some("n"));
        assert!(Args::parse(&words("exec c1 --stdin")).is_err());
    }

    #[test]
    fn rejects_leftovers_and_missing_values() {
        assert!(Args::parse(&words("--name")).is_err());
        let args = Args::parse(&words("--bogus 1")).unwrap();
        assert!(args.finish().unwrap_err().to_string().contains("--bogus"));
        let mut args = Args::parse(&words("--timeout x")).unwrap();
        assert!(args.number("timeout", 1u64).is_err());
    }
}
