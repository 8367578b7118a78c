//! `corvid service install|uninstall|status`: the node as a systemd user service, so that it
//! starts with the owner's session, restarts after a crash, runs at low priority and stops
//! gracefully (SIGTERM: the tasks in hand finish first, see `--stop-grace`).
//!
//! The unit is written to `$XDG_CONFIG_HOME/systemd/user/corvid.service` with the node's
//! flags, checked first by resolving them as `corvid node` would, so a mistake shows at
//! install time and not in the journal. Where no systemd user session answers (a container,
//! a machine without systemd) the unit is still written and the commands to start it are
//! printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;

use crate::config::{ConfigError, NodeArgs, NodeConfig};

/// The unit's name.
pub const UNIT: &str = "corvid.service";
/// Seconds systemd waits after SIGTERM before it kills the node: the default grace and room
/// to close connections.
const STOP_TIMEOUT_SECS: u64 = 45;

/// Why a service command failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the node's flags are not valid: {0}")]
    Flags(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot find the user's config directory (set HOME or XDG_CONFIG_HOME)")]
    NoConfigDir,
    #[error("cannot find this program's path: {0}")]
    Exe(std::io::Error),
    #[error("argument {0:?} holds a control character: a unit file cannot carry it")]
    Unquotable(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`systemctl --user {args}` failed: {why}")]
    Systemctl { args: String, why: String },
    #[error(
        "services are managed with systemd here; on this platform run `corvid node` from its own service manager"
    )]
    Unsupported,
}

/// `corvid node` with the flags given to `corvid service install`, as clap parses it.
#[derive(Debug, Parser)]
#[command(name = "corvid node")]
struct NodeLine {
    #[command(flatten)]
    args: NodeArgs,
}

/// Where the user unit lives: `$XDG_CONFIG_HOME/systemd/user/corvid.service`, or
/// `~/.config/…`.
pub fn unit_path() -> Result<PathBuf, ServiceError> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or(ServiceError::NoConfigDir)?;
    Ok(base.join("systemd").join("user").join(UNIT))
}

/// One argument of `ExecStart=` quoted for systemd: in double quotes with `\` and `"`
/// escaped, and `%` and `$` doubled (systemd would expand them).
pub fn quote(arg: &str) -> Result<String, ServiceError> {
    if arg.chars().any(char::is_control) {
        return Err(ServiceError::Unquotable(arg.to_string()));
    }
    let mut s = String::with_capacity(arg.len() + 2);
    s.push('"');
    for c in arg.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '%' => s.push_str("%%"),
            '$' => s.push_str("$$"),
            c => s.push(c),
        }
    }
    s.push('"');
    Ok(s)
}

/// The unit file running `exe node <flags>` for a node whose data lives in `data_dir`.
pub fn unit_text(exe: &Path, flags: &[String], data_dir: &Path) -> Result<String, ServiceError> {
    let mut cmd = vec![quote(&exe.display().to_string())?, quote("node")?];
    for f in flags {
        cmd.push(quote(f)?);
    }
    Ok(format!(
        "# Written by `corvid service install`; `corvid service uninstall` removes it.\n\
         [Unit]\n\
         Description=Corvid volunteer compute node\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         ExecStart={}\n\
         X-CorvidDataDir={}\n\
         Environment=CORVID_LOG=info\n\
         Restart=on-failure\n\
         RestartSec=10\n\
         # SIGTERM: the node finishes the tasks it holds (--stop-grace), then exits.\n\
         KillSignal=SIGTERM\n\
         KillMode=mixed\n\
         TimeoutStopSec={STOP_TIMEOUT_SECS}\n\
         # Out of the owner's way: lowest CPU and I/O priority.\n\
         Nice=19\n\
         IOSchedulingClass=idle\n\
         NoNewPrivileges=yes\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        cmd.join(" "),
        data_dir.display()
    ))
}

/// The data dir a unit file names, if it is one of ours.
pub fn unit_data_dir(text: &str) -> Option<PathBuf> {
    text.lines()
        .find_map(|l| l.strip_prefix("X-CorvidDataDir="))
        .map(|d| PathBuf::from(d.trim()))
}

/// Whether a systemd user manager answers.
fn user_manager() -> bool {
    Command::new("systemctl")
        .args(["--user", "show-environment"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn systemctl(args: &[&str]) -> Result<String, ServiceError> {
    let fail = |why: String| ServiceError::Systemctl {
        args: args.join(" "),
        why,
    };
    let out = Command::new("systemctl")
        .arg("--user")
        .args(args)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// What `install` did, for the owner to read.
#[derive(Debug)]
pub struct Installed {
    pub unit: PathBuf,
    pub data_dir: PathBuf,
    /// `true` when systemd started it; otherwise why not.
    pub started: Result<(), String>,
}

/// Writes the unit for `corvid node <flags>` and, unless `no_start` or no user manager
/// answers, enables and starts it.
pub fn install(flags: &[String], no_start: bool) -> Result<Installed, ServiceError> {
    if !cfg!(target_os = "linux") {
        return Err(ServiceError::Unsupported);
    }
    let line = std::iter::once("corvid node".to_string()).chain(flags.iter().cloned());
    let parsed = NodeLine::try_parse_from(line).map_err(|e| ServiceError::Flags(e.to_string()))?;
    let config = NodeConfig::resolve(&parsed.args)?;
    let data_dir = config.data_dir.clone().ok_or(ConfigError::NoDataDir)?;
    let exe = std::env::current_exe().map_err(ServiceError::Exe)?;
    let unit = unit_path()?;
    let text = unit_text(&exe, flags, &data_dir)?;
    let write_err = |source| ServiceError::Write {
        path: unit.clone(),
        source,
    };
    if let Some(dir) = unit.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    std::fs::write(&unit, text).map_err(write_err)?;
    let started = if no_start {
        Err("--no-start".to_string())
    } else if !user_manager() {
        Err("no systemd user session answers here".to_string())
    } else {
        systemctl(&["daemon-reload"])
            .and_then(|_| systemctl(&["enable", "--now", UNIT]))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    Ok(Installed {
        unit,
        data_dir,
        started,
    })
}

/// Stops and disables the service if a user manager answers, and removes the unit. Returns
/// the unit's path if there was one.
pub fn uninstall() -> Result<Option<PathBuf>, ServiceError> {
    let unit = unit_path()?;
    if !unit.exists() {
        return Ok(None);
    }
    if user_manager() {
        // Stopping waits for the node's graceful stop.
        systemctl(&["disable", "--now", UNIT])?;
    }
    std::fs::remove_file(&unit).map_err(|source| ServiceError::Write {
        path: unit.clone(),
        source,
    })?;
    if user_manager() {
        let _ = systemctl(&["daemon-reload"]);
    }
    Ok(Some(unit))
}

/// The unit's path and data dir if installed, and systemd's word on it (`active`,
/// `inactive`, `failed`…) or why there is none.
pub fn state() -> Result<Option<(PathBuf, Option<PathBuf>, String)>, ServiceError> {
    let unit = unit_path()?;
    let Ok(text) = std::fs::read_to_string(&unit) else {
        return Ok(None);
    };
    let active = if user_manager() {
        // `is-active` exits non-zero for anything but active; its output is the state.
        Command::new("systemctl")
            .args(["--user", "is-active", UNIT])
            .output()
            .map_or_else(
                |e| e.to_string(),
                |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
            )
    } else {
        "unknown (no systemd user session answers here)".to_string()
    };
    Ok(Some((unit, unit_data_dir(&text), active)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_for_systemd() {
        assert_eq!(quote("plain").unwrap(), "\"plain\"");
        assert_eq!(quote("50%").unwrap(), "\"50%%\"");
        assert_eq!(quote("a b\"c\\d$HOME").unwrap(), "\"a b\\\"c\\\\d$$HOME\"");
        assert!(quote("line\nbreak").is_err());
    }

    #[test]
    fn the_unit_names_the_program_its_flags_and_the_data_dir() {
        let t = unit_text(
            Path::new("/opt/corvid"),
            &["--cpus".into(), "50%".into()],
            Path::new("/home/a/.local/share/corvid"),
        )
        .unwrap();
        assert!(
            t.contains("\nExecStart=\"/opt/corvid\" \"node\" \"--cpus\" \"50%%\"\n"),
            "{t}"
        );
        assert!(t.contains("KillSignal=SIGTERM"));
        assert_eq!(
            unit_data_dir(&t),
            Some(PathBuf::from("/home/a/.local/share/corvid"))
        );
    }
}
