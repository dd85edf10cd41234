//! `--config FILE`: a TOML file of a subcommand's flags, by their long names, e.g. for
//! `twin protect --config /etc/twin/web.toml`:
//!
//! ```toml
//! backup = "10.0.0.3:7000"
//! key-file = "/etc/twin/web.key"
//! interval = "25ms"
//! tap = "tap0"
//! mem = "512M"
//! no-eager = false
//! ```
//!
//! Strings and numbers are the flag's value, `true` gives a switch, `false` leaves it off.
//! The file's values go on the command line right after the subcommand, so every flag
//! the user types overrides them (`args_override_self`) and clap checks them all the same
//! way (a bad value names the flag, exit 2). A key that is not a flag of the subcommand
//! is an error naming the file and the key. `contrib/twin.example.toml` is a full example.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config needs a file")]
    Missing,
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "config file {path}: --config comes after a subcommand (twin SUBCOMMAND --config FILE)"
    )]
    NoSubcommand { path: PathBuf },
    #[error(
        "config file {path}: `{key}` is not an option of `twin {sub}` (see twin {sub} --help)"
    )]
    UnknownKey {
        path: PathBuf,
        key: String,
        sub: String,
    },
    #[error("config file {path}: `{key}` is a switch of `twin {sub}`; give true or false")]
    NotASwitch {
        path: PathBuf,
        key: String,
        sub: String,
    },
    #[error("config file {path}: `{key}` takes a value, not true/false")]
    NeedsValue { path: PathBuf, key: String },
    #[error("config file {path}: `{key}` must be a string, a number or a boolean")]
    BadValue { path: PathBuf, key: String },
}

/// The file named by `--config FILE` / `--config=FILE` in `argv`, if any.
fn config_path(argv: &[OsString]) -> Result<Option<PathBuf>, ConfigError> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it
                .next()
                .map(|p| Some(PathBuf::from(p)))
                .ok_or(ConfigError::Missing);
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Ok(Some(PathBuf::from(p)));
        }
    }
    Ok(None)
}

/// `argv` with the config file's flags inserted after the subcommand (unchanged without
/// `--config`).
pub fn expand_args(argv: Vec<OsString>, cli: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    let Some(path) = config_path(&argv)? else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let sub_name = argv.get(1).and_then(|s| s.to_str()).unwrap_or_default();
    let Some(sub) = cli.find_subcommand(sub_name) else {
        return Err(ConfigError::NoSubcommand { path });
    };
    let flags = flags_from(&path, &text, sub)?;
    let mut out = argv[..2].to_vec();
    out.extend(flags);
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// The command-line flags `text` (a TOML table) stands for, checked against `sub`.
fn flags_from(path: &Path, text: &str, sub: &clap::Command) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
                sub: sub.get_name().to_string(),
            })?;
        let switch = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        let flag = OsString::from(format!("--{long}"));
        match value {
            toml::Value::Boolean(b) if switch => {
                if *b {
                    out.push(flag);
                }
            }
            toml::Value::Boolean(_) => {
                return Err(ConfigError::NeedsValue {
                    path: path.to_path_buf(),
                    key: key.clone(),
                })
            }
            _ if switch => {
                return Err(ConfigError::NotASwitch {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    sub: sub.get_name().to_string(),
                })
            }
            toml::Value::String(s) => {
                out.push(flag);
                out.push(s.into());
            }
            toml::Value::Integer(n) => {
                out.push(flag);
                out.push(n.to_string().into());
            }
            toml::Value::Float(x) => {
                out.push(flag);
                out.push(x.to_string().into());
            }
            _ => {
                return Err(ConfigError::BadValue {
                    path: path.to_path_buf(),
                    key: key.clone(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn cli() -> clap::Command {
        crate::Cli::command()
    }

    fn expand(args: &[&str], toml: &str) -> Result<Vec<String>, ConfigError> {
        let dir = std::env::temp_dir().join(format!("twin-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("{}.toml", args.join("_").len() + toml.len()));
        std::fs::write(&f, toml).unwrap();
        let mut argv: Vec<OsString> = vec!["twin".into()];
        for a in args {
            argv.push(if *a == "FILE" {
                f.clone().into()
            } else {
                (*a).into()
            });
        }
        expand_args(argv, &cli()).map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn a_file_gives_flags_that_the_command_line_overrides() {
        let toml = "backup = \"10.0.0.3:7000\"\ninterval = \"10ms\"\nno_eager = true\nno-auth = true\nvcpus = 2\nencrypt = false\n";
        let argv = expand(&["protect", "--config", "FILE", "--interval", "30ms"], toml).unwrap();
        let parsed = crate::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}\n{argv:?}"));
        let crate::Command::Protect(p) = parsed.command else {
            panic!("not protect")
        };
        assert_eq!(p.backup, "10.0.0.3:7000");
        assert_eq!(
            p.interval.0,
            std::time::Duration::from_millis(30),
            "the flag wins"
        );
        assert!(p.no_eager && p.auth.no_auth && !p.auth.encrypt);
        assert_eq!(p.vm.vcpus, 2);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = expand(&["protect", "--config", "FILE"], "bakcup = \"x:1\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("`bakcup` is not an option of `twin protect`"),
            "{e}"
        );
        let e = expand(&["protect", "--config", "FILE"], "no-eager = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("is a switch"), "{e}");
        let e = expand(&["protect", "--config", "FILE"], "backup = true\n").unwrap_err();
        assert!(e.to_string().contains("takes a value"), "{e}");
        let e = expand(&["protect", "--config", "FILE"], "backup = [\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        // A bad value is clap's to refuse, naming the flag.
        let argv = expand(
            &["run", "--config", "FILE"],
            "tap = \"tap0\"\nmem = \"3M\"\n",
        )
        .unwrap();
        let e = crate::Cli::try_parse_from(&argv).err().unwrap().to_string();
        assert!(e.contains("--mem") && e.contains("multiple of 2M"), "{e}");
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../contrib/twin.example.toml");
        let argv = expand(&["protect", "--config", "FILE"], text).unwrap();
        crate::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}\n{argv:?}"));
        let text = include_str!("../../contrib/twin-backup.example.toml");
        let argv = expand(&["backup", "--config", "FILE"], text).unwrap();
        crate::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}\n{argv:?}"));
    }
}
