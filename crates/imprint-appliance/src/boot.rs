//! Early boot of PID 1: everything between the kernel handing over and the install flow.
//!
//! [`init`] mounts the API filesystems, reads the kernel command line, loads the kernel modules
//! the hardware asks for (coldplug: every device's `modalias` matched against `modules.alias`,
//! with dependencies and soft dependencies in order, repeated while new devices appear, as udev
//! would) and waits, bounded, until the block devices settle. [`Consoles`] writes every line to
//! all consoles at once (serial and screen), since nobody knows which one an operator watches.
//!
//! The pieces that decide something ([`ModuleIndex`], [`modaliases`], [`Cmdline`],
//! [`block_devices`]) take their roots (`/proc`, `/sys`, the module directory) as parameters, so
//! the unit tests run them against fake trees.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imprint_core::stick::{CMDLINE_ESP_PARAM, ESP_LABEL};
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

/// How long [`init`] waits at most for devices (the USB stick enumerates last) to appear.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// The device set counts as settled once nothing new appeared for this long.
const SETTLE_QUIET: Duration = Duration::from_millis(1500);
const POLL: Duration = Duration::from_millis(100);

/// Modules loaded whatever the hardware says: `sd_mod` binds SCSI disks (SATA, USB) but no
/// device alias names it; the filesystems are needed to read the stick and write the seed.
pub const ALWAYS_LOAD: &[&str] = &[
    "sd_mod",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_utf8",
    "ext4",
    "efivarfs",
    // Root-filesystem seed placement mounts the root partition through a loop device before
    // the partition table is committed.
    "loop",
];

/// Module parameters PID 1 passes itself (there is no modprobe.d): `delay_use=0` makes a USB
/// disk usable at once instead of after the default one-second settle delay.
pub const DEFAULT_MODULE_PARAMS: &[(&str, &str)] = &[("usb_storage", "delay_use=0")];

/// Errors of early boot; each names the step and the object.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Index {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

/// The system roots early boot reads. [`Roots::system`] for PID 1; tests point them at fake trees.
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub dev: PathBuf,
    /// `/lib/modules/<kernel release>`.
    pub modules: PathBuf,
}

impl Roots {
    /// The real roots; the module directory follows the running kernel's release.
    pub fn system() -> Self {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Roots {
            proc: "/proc".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            modules: Path::new("/lib/modules").join(release),
        }
    }
}

/// What early boot found; the install flow starts from here.
#[derive(Debug, Clone)]
pub struct BootEnv {
    pub cmdline: Cmdline,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Modules loaded, in load order.
    pub modules_loaded: Vec<String>,
    /// Modules that failed to load, with the reason. Not fatal: a driver for hardware that is
    /// absent or a CPU-specific checksum module may refuse, and the rest still works.
    pub module_failures: Vec<(String, String)>,
    /// Whether `/sys/firmware/efi/efivars` is mounted (UEFI boot; BootNext can be set).
    pub efivars: bool,
    /// The stick's ESP, when the command line names its PARTUUID and the partition was seen.
    pub esp: Option<EspPartition>,
    /// True when the device set settled before [`SETTLE_TIMEOUT`].
    pub settled: bool,
    /// Time from PID 1 start to the end of [`init`].
    pub elapsed: Duration,
}

/// Early boot for PID 1: mounts, command line, modules, settle. Messages go to `consoles`.
/// Only a failing mount of `/proc`, `/sys` or `/dev` is an error: without them nothing works.
pub fn init(consoles: &mut Consoles) -> Result<BootEnv, BootError> {
    let start = Instant::now();
    mount_api_filesystems()?;
    // The consoles opened before /dev was a devtmpfs only had /dev/console from the archive.
    consoles.reopen(Path::new("/sys"), Path::new("/dev"));
    let roots = Roots::system();
    let cmdline = Cmdline::read(&roots.proc)?;
    let kernel_release = roots
        .modules
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    consoles.line(&format!(
        "imprint: kernel {kernel_release}, loading drivers"
    ));

    let mut loader = match ModuleIndex::load(&roots.modules) {
        Ok(index) => Some(ModuleLoader::new(
            index,
            module_params(&cmdline),
            KernelInsert,
        )),
        Err(e) => {
            consoles.line(&format!("imprint: no kernel modules: {}", error_chain(&e)));
            None
        }
    };
    if let Some(loader) = loader.as_mut() {
        for module in ALWAYS_LOAD {
            loader.load(module);
        }
    }
    let efivars = mount_efivarfs(consoles);
    let esp_partuuid = cmdline.get(CMDLINE_ESP_PARAM).map(str::to_owned);
    let (settled, esp) =
        coldplug_and_settle(&roots, loader.as_mut(), esp_partuuid.as_deref(), consoles);
    let (modules_loaded, module_failures) = match loader {
        Some(l) => (l.loaded_order, l.failures),
        None => (Vec::new(), Vec::new()),
    };
    for (module, reason) in &module_failures {
        consoles.line(&format!("imprint: module {module} not loaded: {reason}"));
    }
    Ok(BootEnv {
        cmdline,
        kernel_release,
        modules_loaded,
        module_failures,
        efivars,
        esp,
        settled,
        elapsed: start.elapsed(),
    })
}

fn mount_api_filesystems() -> Result<(), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let mounts: [(&'static str, &str, MsFlags, Option<&str>); 4] = [
        ("proc", "/proc", nosuid, None),
        ("sysfs", "/sys", nosuid, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (fstype, target, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            // EBUSY: already mounted (PID 1 restarted by a debugger, or the kernel did it).
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(BootError::Mount {
                    fstype,
                    target: target.into(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Mounts efivarfs where UEFI provides variables. Not fatal: the flow only loses the ability
/// to set BootNext, and says so.
fn mount_efivarfs(consoles: &mut Consoles) -> bool {
    let target = Path::new("/sys/firmware/efi/efivars");
    if !target.is_dir() {
        consoles.line("imprint: no EFI variables (legacy BIOS boot?)");
        return false;
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    match mount(
        Some("efivarfs"),
        target,
        Some("efivarfs"),
        flags,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::Error::EBUSY) => true,
        Err(e) => {
            consoles.line(&format!("imprint: mounting efivarfs: {e}"));
            false
        }
    }
}

/// Loads drivers for every device (repeating while loading drivers makes new devices appear:
/// xhci first, then the USB disks behind it) until nothing changed for [`SETTLE_QUIET`] and,
/// when the command line names the stick's ESP, that partition has appeared.
fn coldplug_and_settle<I: InsertModule>(
    roots: &Roots,
    mut loader: Option<&mut ModuleLoader<I>>,
    esp_partuuid: Option<&str>,
    consoles: &mut Consoles,
) -> (bool, Option<EspPartition>) {
    let start = Instant::now();
    let mut seen_aliases = BTreeSet::new();
    let mut seen_blocks = BTreeSet::new();
    let mut last_change = Instant::now();
    let mut announced = false;
    loop {
        let aliases = modaliases(&roots.sys.join("devices"));
        let new: Vec<String> = aliases.difference(&seen_aliases).cloned().collect();
        if let Some(loader) = loader.as_deref_mut() {
            for alias in &new {
                loader.load_for_alias(alias);
            }
        }
        let blocks: BTreeSet<String> = list_dir(&roots.sys.join("class/block"));
        if !new.is_empty() || blocks != seen_blocks {
            last_change = Instant::now();
        }
        seen_aliases.extend(new);
        seen_blocks = blocks;
        let esp = esp_partuuid.and_then(|uuid| find_esp(&roots.sys, &roots.dev, uuid));
        let esp_ok = esp_partuuid.is_none() || esp.is_some();
        if esp_ok && last_change.elapsed() >= SETTLE_QUIET {
            return (true, esp);
        }
        if start.elapsed() >= SETTLE_TIMEOUT {
            if !esp_ok {
                consoles.line(&format!(
                    "imprint: the stick's partition {} did not appear within {}s",
                    esp_partuuid.unwrap_or_default(),
                    SETTLE_TIMEOUT.as_secs()
                ));
            }
            return (false, esp);
        }
        if !announced && start.elapsed() >= Duration::from_secs(2) {
            consoles.line(&format!(
                "imprint: waiting for disks to settle (up to {}s)",
                SETTLE_TIMEOUT.as_secs()
            ));
            announced = true;
        }
        std::thread::sleep(POLL);
    }
}

fn list_dir(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The kernel command line, split like the kernel does (double quotes group spaces).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Reads `<proc>/cmdline`.
    pub fn read(proc: &Path) -> Result<Self, BootError> {
        let path = proc.join("cmdline");
        let text = fs::read_to_string(&path).map_err(|source| BootError::Read { path, source })?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut push = |word: &mut String| {
            if !word.is_empty() {
                let param = match word.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (word.clone(), None),
                };
                params.push(param);
                word.clear();
            }
        };
        for c in text.chars() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => push(&mut word),
                c => word.push(c),
            }
        }
        push(&mut word);
        Cmdline { params }
    }

    /// Value of the last `key=value` (the kernel's rule: later wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// True when `key` appears, with or without a value.
    pub fn has(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }

    pub fn params(&self) -> &[(String, Option<String>)] {
        &self.params
    }
}

/// Module parameters: [`DEFAULT_MODULE_PARAMS`], then `module.param=value` from the command
/// line (as kmod's modprobe honours them), by normalised module name.
pub fn module_params(cmdline: &Cmdline) -> HashMap<String, Vec<String>> {
    let mut params: HashMap<String, Vec<String>> = HashMap::new();
    for (module, param) in DEFAULT_MODULE_PARAMS {
        params
            .entry(normalize(module))
            .or_default()
            .push((*param).to_owned());
    }
    for (key, value) in cmdline.params() {
        // "imprint.esp" is ours, not a module's; dots inside values do not matter.
        let Some((module, param)) = key.split_once('.') else {
            continue;
        };
        if module == "imprint" || module.is_empty() || param.is_empty() {
            continue;
        }
        let param = match value {
            Some(v) => format!("{param}={v}"),
            None => param.to_owned(),
        };
        params.entry(normalize(module)).or_default().push(param);
    }
    params
}

/// kmod's module name rule: `-` and `_` are the same.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a `modules.dep` path: `kernel/drivers/usb/storage/usb-storage.ko` → `usb_storage`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// The text indexes `depmod` writes: `modules.dep`, `modules.alias`, `modules.softdep`,
/// `modules.builtin`.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Module name → (path relative to `dir`, its dependencies by name).
    deps: HashMap<String, (PathBuf, Vec<String>)>,
    /// (glob pattern, module name) in file order.
    aliases: Vec<(String, String)>,
    /// Module name → (pre: names, post: names); names may be aliases.
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Reads the indexes in `dir` (`/lib/modules/<release>`). `modules.dep` must exist; the
    /// others may be missing (a tree with no aliases loads nothing by coldplug).
    pub fn load(dir: &Path) -> Result<Self, BootError> {
        let read = |name: &str, required: bool| -> Result<String, BootError> {
            let path = dir.join(name);
            match fs::read_to_string(&path) {
                Ok(s) => Ok(s),
                Err(e) if !required && e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
                Err(source) => Err(BootError::Read { path, source }),
            }
        };
        let mut index = ModuleIndex {
            dir: dir.to_owned(),
            ..Default::default()
        };
        for (n, line) in read("modules.dep", true)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(BootError::Index {
                    path: dir.join("modules.dep"),
                    line: n + 1,
                    reason: "expected `module.ko: deps`",
                });
            };
            let deps = deps.split_whitespace().map(module_name).collect();
            index
                .deps
                .insert(module_name(path), (PathBuf::from(path.trim()), deps));
        }
        for line in read("modules.alias", false)?.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                index.aliases.push((pattern.to_owned(), normalize(module)));
            }
        }
        for line in read("modules.softdep", false)?.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let entry = index.softdeps.entry(normalize(module)).or_default();
            // "pre:" / "post:" switch lists; names before any marker count as pre (kmod).
            let mut post = false;
            for word in words {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    name if post => entry.1.push(name.to_owned()),
                    name => entry.0.push(name.to_owned()),
                }
            }
        }
        for line in read("modules.builtin", false)?.lines() {
            if !line.trim().is_empty() {
                index.builtin.insert(module_name(line));
            }
        }
        Ok(index)
    }

    /// Modules whose `modules.alias` pattern matches `modalias`, deduplicated, in file order.
    pub fn modules_for_alias(&self, modalias: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if !out.contains(module) && glob_match(pattern.as_bytes(), modalias.as_bytes()) {
                out.push(module.clone());
            }
        }
        out
    }

    /// Resolves a name as modprobe does: a module name (or a built-in one) is itself, anything
    /// else is an alias (softdeps name `crypto-crc32c`, `platform:idma64`).
    pub fn resolve(&self, name: &str) -> Vec<String> {
        let norm = normalize(name);
        if self.deps.contains_key(&norm) || self.builtin.contains(&norm) {
            vec![norm]
        } else {
            self.modules_for_alias(name)
        }
    }

    pub fn is_builtin(&self, module: &str) -> bool {
        self.builtin.contains(&normalize(module))
    }

    /// Absolute path of a loadable module's file.
    pub fn path(&self, module: &str) -> Option<PathBuf> {
        self.deps
            .get(&normalize(module))
            .map(|(p, _)| self.dir.join(p))
    }

    /// The order in which to load `module`: soft pre-dependencies, hard dependencies (each with
    /// its own), the module, soft post-dependencies; each module once. Unknown names are left
    /// out (the loader reports them).
    pub fn load_order(&self, module: &str) -> Vec<String> {
        let mut order = Vec::new();
        let mut visiting = HashSet::new();
        self.visit(&normalize(module), &mut order, &mut visiting);
        order
    }

    fn visit(&self, module: &str, order: &mut Vec<String>, visiting: &mut HashSet<String>) {
        // `visiting` also breaks the cycles softdeps can form (a pre: b, b post: a).
        if order.iter().any(|m| m == module) || !visiting.insert(module.to_owned()) {
            return;
        }
        let Some((_, deps)) = self.deps.get(module) else {
            return;
        };
        let (pre, post) = self.softdeps.get(module).cloned().unwrap_or_default();
        for name in &pre {
            for m in self.resolve(name) {
                self.visit(&m, order, visiting);
            }
        }
        // modules.dep lists the whole closure, the deepest last: reverse it so each dependency
        // comes after its own dependencies; the recursion keeps that true for any list order.
        for dep in deps.iter().rev() {
            self.visit(dep, order, visiting);
        }
        order.push(module.to_owned());
        for name in &post {
            for m in self.resolve(name) {
                self.visit(&m, order, visiting);
            }
        }
    }
}

/// fnmatch(3) without flags, as kmod matches `modules.alias`: `*`, `?`, `[...]` with ranges and
/// `!`/`^` negation. Iterative with single-star backtracking.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == b'[' {
                        // An unterminated '[' is a literal.
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[start] == b'['`; returns (matched, index
/// after `]`), or None when the class is not terminated.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = *pattern.get(i)?;
        if lo == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = pattern[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
}

/// Every `modalias` under `devices` (normally `/sys/devices`). Symlinks are not followed:
/// sysfs links `subsystem`, `driver`, `port` back up the tree.
pub fn modaliases(devices: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk_modaliases(devices, 0, &mut out);
    out
}

fn walk_modaliases(dir: &Path, depth: usize, out: &mut BTreeSet<String>) {
    // Real device trees are < 20 deep; the bound only guards against a surprise.
    if depth > 40 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            walk_modaliases(&entry.path(), depth + 1, out);
        } else if ft.is_file() && entry.file_name() == "modalias" {
            if let Ok(s) = fs::read_to_string(entry.path()) {
                let s = s.trim();
                if !s.is_empty() {
                    out.insert(s.to_owned());
                }
            }
        }
    }
}

/// The one syscall the loader needs, behind a trait so the load order is tested without a
/// kernel.
pub trait InsertModule {
    /// Inserts the module file at `path` with `params` (space-separated `name=value`).
    fn insert(&mut self, path: &Path, params: &str) -> io::Result<()>;
}

/// `finit_module(2)` on the module file.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelInsert;

impl InsertModule for KernelInsert {
    fn insert(&mut self, path: &Path, params: &str) -> io::Result<()> {
        let file = File::open(path)?;
        let params = CString::new(params)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in parameters"))?;
        finit_module(&file, &params, ModuleInitFlags::empty()).map_err(io::Error::from)
    }
}

/// Loads modules with their dependencies, each at most once, remembering what failed.
#[derive(Debug)]
pub struct ModuleLoader<I> {
    index: ModuleIndex,
    params: HashMap<String, Vec<String>>,
    inserter: I,
    attempted: HashSet<String>,
    /// Modules inserted (or found already present), in order.
    pub loaded_order: Vec<String>,
    pub failures: Vec<(String, String)>,
}

impl<I: InsertModule> ModuleLoader<I> {
    pub fn new(index: ModuleIndex, params: HashMap<String, Vec<String>>, inserter: I) -> Self {
        ModuleLoader {
            index,
            params,
            inserter,
            attempted: HashSet::new(),
            loaded_order: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn index(&self) -> &ModuleIndex {
        &self.index
    }

    /// Loads every module a device's modalias matches.
    pub fn load_for_alias(&mut self, modalias: &str) {
        for module in self.index.modules_for_alias(modalias) {
            self.load(&module);
        }
    }

    /// Loads a module (by name or alias) and what it needs. Returns false if it, or a hard
    /// dependency of it, could not be loaded.
    pub fn load(&mut self, name: &str) -> bool {
        let modules = self.index.resolve(name);
        if modules.is_empty() {
            if self.attempted.insert(normalize(name)) {
                self.failures.push((
                    normalize(name),
                    "not in modules.dep or modules.alias".into(),
                ));
            }
            return false;
        }
        let mut ok = true;
        for module in modules {
            if self.index.is_builtin(&module) {
                continue;
            }
            for m in self.index.load_order(&module) {
                self.insert_once(&m);
            }
            // A failed soft dependency is not the module's failure; a failed hard one is.
            ok &= self.loaded_order.contains(&module);
        }
        ok
    }

    fn insert_once(&mut self, module: &str) {
        if !self.attempted.insert(module.to_owned()) {
            return;
        }
        let Some(path) = self.index.path(module) else {
            self.failures
                .push((module.to_owned(), "not in modules.dep".into()));
            return;
        };
        let params = self
            .params
            .get(module)
            .map(|p| p.join(" "))
            .unwrap_or_default();
        match self.inserter.insert(&path, &params) {
            Ok(()) => {}
            // Already there: loaded earlier by someone else (or built in after all).
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
            Err(e) => {
                self.failures.push((module.to_owned(), e.to_string()));
                return;
            }
        }
        self.loaded_order.push(module.to_owned());
    }
}

/// The stick's EFI System Partition as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspPartition {
    /// Partition device name, e.g. `sda1`.
    pub partition: String,
    /// Whole-disk device name, e.g. `sda`.
    pub disk: String,
}

/// Finds the partition whose PARTUUID is `partuuid`. The partition's `uevent` carries it on
/// newer kernels; otherwise (Debian's 6.1) the unique partition GUID is read from the GPT on
/// `<dev>/<disk>` for the partition number the kernel reports (`PARTN`). Only when neither
/// works is a partition named [`ESP_LABEL`] taken, and only if it is the one such partition
/// whose GUID is unknown.
pub fn find_esp(sys: &Path, dev: &Path, partuuid: &str) -> Option<EspPartition> {
    let mut by_name = Vec::new();
    let class = sys.join("class/block");
    for name in list_dir(&class) {
        let Ok(uevent) = fs::read_to_string(class.join(&name).join("uevent")) else {
            continue;
        };
        let var = |key: &str| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
        };
        if var("DEVTYPE").as_deref() != Some("partition") {
            continue;
        }
        let disk = fs::canonicalize(class.join(&name))
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|d| d.to_owned()))
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let guid = var("PARTUUID").or_else(|| {
            let partn = var("PARTN")?.parse().ok()?;
            let sector = fs::read_to_string(
                sys.join("block")
                    .join(&disk)
                    .join("queue/logical_block_size"),
            )
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512);
            gpt_partition_guid(&dev.join(&disk), sector, partn)
        });
        let part = EspPartition {
            partition: name.clone(),
            disk,
        };
        match guid {
            Some(guid) if guid.eq_ignore_ascii_case(partuuid) => return Some(part),
            Some(_) => {}
            None if var("PARTNAME").as_deref() == Some(ESP_LABEL) => by_name.push(part),
            None => {}
        }
    }
    if by_name.len() == 1 {
        by_name.pop()
    } else {
        None
    }
}

/// The unique GUID of GPT partition `partn` (1-based) on the disk at `path`, lower-case.
fn gpt_partition_guid(path: &Path, sector: u64, partn: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut disk = File::open(path).ok()?;
    let mut header = [0u8; 92];
    disk.seek(SeekFrom::Start(sector)).ok()?;
    disk.read_exact(&mut header).ok()?;
    if &header[..8] != b"EFI PART" {
        return None;
    }
    let le64 = |b: &[u8]| b.try_into().ok().map(u64::from_le_bytes);
    let le32 = |b: &[u8]| b.try_into().ok().map(u32::from_le_bytes);
    let entries_lba = le64(&header[72..80])?;
    let count = u64::from(le32(&header[80..84])?);
    let size = u64::from(le32(&header[84..88])?);
    if partn == 0 || partn > count || size < 128 {
        return None;
    }
    let mut entry = [0u8; 128];
    let offset = entries_lba
        .checked_mul(sector)?
        .checked_add((partn - 1).checked_mul(size)?)?;
    disk.seek(SeekFrom::Start(offset)).ok()?;
    disk.read_exact(&mut entry).ok()?;
    let g = &entry[16..32];
    if g.iter().all(|&b| b == 0) {
        return None;
    }
    // Mixed endian: the first three fields little-endian, the rest as stored.
    Some(format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    ))
}

/// How a disk is attached, from its resolved `/sys/block` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    Nvme,
    Sata,
    Usb,
    Virtio,
    Mmc,
    Other,
}

impl Transport {
    /// Classifies a resolved sysfs device path. USB wins over everything below it (a USB-NVMe
    /// enclosure is a USB disk); `removable` and `rotational` are not trusted (USB SSDs report
    /// removable=0).
    pub fn from_sys_path(path: &str) -> Self {
        let has_numbered = |prefix: &str| {
            path.split('/').any(|c| {
                c.strip_prefix(prefix)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        if has_numbered("usb") {
            Transport::Usb
        } else if path.contains("/nvme/") || has_numbered("nvme") {
            Transport::Nvme
        } else if has_numbered("ata") {
            Transport::Sata
        } else if has_numbered("virtio") {
            Transport::Virtio
        } else if path.contains("/mmc_host/") {
            Transport::Mmc
        } else {
            Transport::Other
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Nvme => "nvme",
            Transport::Sata => "sata",
            Transport::Usb => "usb",
            Transport::Virtio => "virtio",
            Transport::Mmc => "mmc",
            Transport::Other => "other",
        }
    }
}

/// A whole disk as early boot reports it (the install flow's discovery goes deeper).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub serial: String,
    pub transport: Transport,
    /// Resolved sysfs path.
    pub sys_path: PathBuf,
}

/// Whole disks under `<sys>/block`, sorted by name; RAM, loop and empty devices left out.
pub fn block_devices(sys: &Path) -> Vec<BlockDevice> {
    let block = sys.join("block");
    let mut out = Vec::new();
    for name in list_dir(&block) {
        if ["loop", "ram", "zram", "sr"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let dir = block.join(&name);
        let read = |rel: &str| {
            fs::read_to_string(dir.join(rel))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        // `size` is in 512-byte units whatever the logical sector size.
        let size_bytes = read("size").parse::<u64>().unwrap_or(0).saturating_mul(512);
        if size_bytes == 0 {
            continue;
        }
        let sys_path = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        let transport = Transport::from_sys_path(&sys_path.to_string_lossy());
        let mut serial = read("device/serial");
        if serial.is_empty() {
            serial = vpd_serial(&dir.join("device/vpd_pg80"));
        }
        if serial.is_empty() {
            serial = ancestor_attribute(&sys_path, "serial");
        }
        out.push(BlockDevice {
            model: read("device/model"),
            name,
            size_bytes,
            serial,
            transport,
            sys_path,
        });
    }
    out
}

/// SCSI VPD page 0x80 (unit serial number): 4-byte header, then the serial (libata fills it
/// from the ATA IDENTIFY data, so SATA disks have it too).
fn vpd_serial(path: &Path) -> String {
    fs::read(path)
        .ok()
        .filter(|b| b.len() > 4)
        .map(|b| {
            String::from_utf8_lossy(&b[4..])
                .trim()
                .trim_matches('\0')
                .to_owned()
        })
        .unwrap_or_default()
}

/// The first `attr` file found walking up from `path` (the USB device above a USB disk holds
/// its `serial`).
fn ancestor_attribute(path: &Path, attr: &str) -> String {
    path.ancestors()
        .skip(1)
        .take(12)
        .find_map(|dir| fs::read_to_string(dir.join(attr)).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Human size: 1 decimal, binary units.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A table of disks, one line each, for the consoles.
pub fn format_disk_table(disks: &[BlockDevice], esp: Option<&EspPartition>) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<10} {:>10}  {:<9} {:<24} {:<20} {}",
        "NAME", "SIZE", "TRANSPORT", "MODEL", "SERIAL", "ROLE"
    )];
    for d in disks {
        let role = if esp.is_some_and(|e| e.disk == d.name) {
            "imprint stick"
        } else {
            ""
        };
        lines.push(
            format!(
                "{:<10} {:>10}  {:<9} {:<24} {:<20} {}",
                d.name,
                human_size(d.size_bytes),
                d.transport.as_str(),
                d.model,
                d.serial,
                role
            )
            .trim_end()
            .to_owned(),
        );
    }
    lines
}

/// Every console an operator might watch: the kernel's active consoles (`console=` on the
/// command line, e.g. `tty0 ttyS0`), plus `tty0` (the screen) and `ttyS0` (serial) when they
/// exist, each once. Falls back to `/dev/console`. A console whose write fails is dropped, so
/// an absent serial port cannot stall the flow.
#[derive(Debug, Default)]
pub struct Consoles {
    outputs: Vec<(String, File)>,
}

impl Consoles {
    /// Opens the consoles. Before `/dev` is mounted only `/dev/console` (from the initramfs)
    /// exists; [`init`] calls [`Consoles::reopen`] once it is.
    pub fn open(sys: &Path, dev: &Path) -> Self {
        let mut c = Consoles::default();
        c.reopen(sys, dev);
        c
    }

    /// Names of the consoles to write to, in order, deduplicated.
    pub fn names(sys: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_to_string(sys.join("class/tty/console/active"))
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        for extra in ["tty0", "ttyS0"] {
            // tty1..N are VTs shown on the screen, as tty0 is: writing both doubles lines.
            let screen = extra == "tty0" && names.iter().any(|n| is_vt(n));
            if !screen && !names.iter().any(|n| n == extra) {
                names.push(extra.to_owned());
            }
        }
        names
    }

    /// (Re)opens the consoles, e.g. after `/dev` became a devtmpfs.
    pub fn reopen(&mut self, sys: &Path, dev: &Path) {
        self.outputs.clear();
        for name in Self::names(sys) {
            if let Ok(file) = open_console(&dev.join(&name)) {
                self.outputs.push((name, file));
            }
        }
        if self.outputs.is_empty() {
            if let Ok(file) = open_console(&dev.join("console")) {
                self.outputs.push(("console".into(), file));
            }
        }
    }

    /// Names of the consoles currently written to.
    pub fn active(&self) -> Vec<&str> {
        self.outputs.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Writes one line (CRLF: a serial console in raw mode does not translate LF).
    pub fn line(&mut self, text: &str) {
        let mut bytes = text.replace('\n', "\r\n").into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.write_all_consoles(&bytes);
    }

    fn write_all_consoles(&mut self, bytes: &[u8]) {
        self.outputs.retain_mut(|(_, f)| f.write_all(bytes).is_ok());
    }
}

impl Write for Consoles {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_consoles(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_vt(name: &str) -> bool {
    name.strip_prefix("tty")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Opens a console for writing without making it our controlling terminal and without
/// blocking on modem lines (O_NONBLOCK only for the open: writes then block normally, so a
/// full serial buffer slows us down instead of losing lines).
fn open_console(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
        .open(path)?;
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(file)
}

/// The error and its causes on one line, for the consoles.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Flushes filesystems and powers the machine off. Never returns: if the kernel refuses, PID 1
/// must still not exit (that would panic the kernel), so it waits forever.
pub fn power_off(consoles: &mut Consoles) -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    consoles.line(&format!("imprint: power off failed: {e}"));
    halt_forever()
}

/// Reboots. Never returns (see [`power_off`]).
pub fn reboot(consoles: &mut Consoles) -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    consoles.line(&format!("imprint: reboot failed: {e}"));
    halt_forever()
}

/// Waits forever: what PID 1 does when there is nothing left it can do safely.
pub fn halt_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Groups disks by transport, for summaries.
pub fn count_by_transport(disks: &[BlockDevice]) -> BTreeMap<Transport, usize> {
    let mut counts = BTreeMap::new();
    for d in disks {
        *counts.entry(d.transport).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// A module tree shaped like Debian 6.1's, reduced.
    fn fake_modules() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("modules.dep"),
            "kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/lib/crc64.ko kernel/lib/crc-t10dif.ko\n\
             kernel/drivers/nvme/host/nvme-core.ko: kernel/block/t10-pi.ko kernel/lib/crc64-rocksoft.ko kernel/lib/crc64.ko kernel/lib/crc-t10dif.ko\n\
             kernel/block/t10-pi.ko: kernel/lib/crc64-rocksoft.ko kernel/lib/crc64.ko kernel/lib/crc-t10dif.ko\n\
             kernel/lib/crc64-rocksoft.ko: kernel/lib/crc64.ko\n\
             kernel/lib/crc64.ko:\n\
             kernel/lib/crc-t10dif.ko:\n\
             kernel/crypto/crct10dif_generic.ko:\n\
             kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/usb/core/usbcore.ko\n\
             kernel/drivers/usb/core/usbcore.ko:\n\
             kernel/drivers/usb/host/xhci-pci.ko: kernel/drivers/usb/host/xhci-hcd.ko kernel/drivers/usb/core/usbcore.ko\n\
             kernel/drivers/usb/host/xhci-hcd.ko: kernel/drivers/usb/core/usbcore.ko\n\
             kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko\n\
             kernel/fs/jbd2/jbd2.ko:\n\
             kernel/crypto/crc32c_generic.ko:\n\
             kernel/arch/x86/crypto/crc32c-intel.ko:\n\
             kernel/drivers/scsi/sd_mod.ko:\n",
        );
        write(
            &d.join("modules.alias"),
            "# Aliases extracted from modules themselves.\n\
             alias pci:v*d*sv*sd*bc01sc08i02* nvme\n\
             alias pci:v*d*sv*sd*bc0Csc03i30* xhci_pci\n\
             alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage\n\
             alias usb:v0BC2p3312d[0-9]*dc*dsc*dp*ic*isc*ip*in* usb_storage\n\
             alias crypto-crc32c crc32c_generic\n\
             alias crypto-crc32c crc32c_intel\n\
             alias crypto-crct10dif crct10dif_generic\n\
             alias crct10dif crct10dif_generic\n",
        );
        write(
            &d.join("modules.softdep"),
            "# Soft dependencies extracted from modules themselves.\n\
             softdep ext4 pre: crypto-crc32c\n\
             softdep crc_t10dif pre: crct10dif\n",
        );
        write(
            &d.join("modules.builtin"),
            "kernel/drivers/input/keyboard/atkbd.ko\n",
        );
        dir
    }

    #[derive(Default)]
    struct Recorder {
        calls: Vec<(String, String)>,
        refuse: Vec<&'static str>,
    }

    impl InsertModule for &mut Recorder {
        fn insert(&mut self, path: &Path, params: &str) -> io::Result<()> {
            let name = module_name(&path.to_string_lossy());
            if self.refuse.contains(&name.as_str()) {
                return Err(io::Error::from_raw_os_error(nix::libc::ENODEV));
            }
            self.calls.push((name, params.to_owned()));
            Ok(())
        }
    }

    #[test]
    fn glob_matches_like_fnmatch() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"
        ));
        assert!(!m(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc06i01"
        ));
        assert!(m("usb:v0BC2p3312d[0-9]*", "usb:v0BC2p3312d0100dc00"));
        assert!(!m("usb:v0BC2p3312d[0-9]*", "usb:v0BC2p3312dA100dc00"));
        assert!(m("a[!x]c", "abc"));
        assert!(!m("a[!x]c", "axc"));
        assert!(m("a[^x]c", "abc"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("a[]]b", "a]b"));
        assert!(m("x[", "x["));
        assert!(m(
            "cpu:type:x86,ven*fam*mod*:feature:*0094*",
            "cpu:type:x86,ven0000fam0006mod003A:feature:,0000,0001,0094,00C0"
        ));
    }

    #[test]
    fn load_order_puts_dependencies_and_softdeps_first() {
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        assert_eq!(
            index.load_order("nvme"),
            [
                "crct10dif_generic",
                "crc_t10dif",
                "crc64",
                "crc64_rocksoft",
                "t10_pi",
                "nvme_core",
                "nvme"
            ]
        );
        // Softdep by alias resolves to every matching module, before ext4 and its deps.
        assert_eq!(
            index.load_order("ext4"),
            ["crc32c_generic", "crc32c_intel", "jbd2", "ext4"]
        );
        assert_eq!(index.resolve("usb-storage"), ["usb_storage"]);
        assert_eq!(
            index.resolve("crypto-crc32c"),
            ["crc32c_generic", "crc32c_intel"]
        );
        assert!(index.is_builtin("atkbd"));
        assert!(index
            .path("usb-storage")
            .unwrap()
            .ends_with("kernel/drivers/usb/storage/usb-storage.ko"));
    }

    #[test]
    fn loader_loads_once_with_params_and_records_failures() {
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let mut rec = Recorder {
            refuse: vec!["crc32c_intel"],
            ..Default::default()
        };
        let params = module_params(&Cmdline::parse(
            "quiet usb-storage.quirks=0bc2:3312:u imprint.esp=x",
        ));
        {
            let mut loader = ModuleLoader::new(index, params, &mut rec);
            loader.load_for_alias("pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30");
            loader.load_for_alias("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00");
            assert!(loader.load("ext4"));
            assert!(loader.load("atkbd"));
            assert!(!loader.load("no_such_module"));
            assert!(loader.load("usb_storage"));
            assert_eq!(
                loader.failures,
                [
                    (
                        "crc32c_intel".to_string(),
                        io::Error::from_raw_os_error(nix::libc::ENODEV).to_string()
                    ),
                    (
                        "no_such_module".to_string(),
                        "not in modules.dep or modules.alias".to_string()
                    )
                ]
            );
        }
        let names: Vec<_> = rec.calls.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "usbcore",
                "xhci_hcd",
                "xhci_pci",
                "usb_storage",
                "crc32c_generic",
                "jbd2",
                "ext4"
            ]
        );
        assert_eq!(rec.calls[3].1, "delay_use=0 quirks=0bc2:3312:u");
        assert_eq!(rec.calls[0].1, "");
    }

    #[test]
    fn missing_modules_dep_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ModuleIndex::load(dir.path()),
            Err(BootError::Read { .. })
        ));
    }

    #[test]
    fn cmdline_parses_quotes_and_last_value_wins() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/vmlinuz console=tty0 console=ttyS0,115200 panic=0 imprint.esp=0FC63DAF-1 \"x=a b\" ro\n",
        );
        assert_eq!(c.get("console"), Some("ttyS0,115200"));
        assert_eq!(c.get("imprint.esp"), Some("0FC63DAF-1"));
        assert_eq!(c.get("x"), Some("a b"));
        assert!(c.has("ro"));
        assert_eq!(c.get("ro"), None);
        assert_eq!(c.get("quiet"), None);
    }

    #[test]
    fn modaliases_walk_sysfs_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("devices");
        write(
            &dev.join("pci0000:00/0000:00:04.0/modalias"),
            "pci:v00001B36d00000010\n",
        );
        write(
            &dev.join("pci0000:00/0000:00:05.0/usb1/1-1/1-1:1.0/modalias"),
            "usb:v46F4p0001\n",
        );
        write(&dev.join("platform/serial8250/modalias"), "\n");
        // A link back up the tree must not be walked (sysfs is full of them).
        std::os::unix::fs::symlink(&dev, dev.join("pci0000:00/0000:00:04.0/subsystem")).unwrap();
        let found: Vec<_> = modaliases(&dev).into_iter().collect();
        assert_eq!(found, ["pci:v00001B36d00000010", "usb:v46F4p0001"]);
    }

    #[test]
    fn transport_follows_the_resolved_path() {
        let t = Transport::from_sys_path;
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1"),
            Transport::Nvme
        );
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"),
            Transport::Sata
        );
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb"),
            Transport::Usb
        );
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:06.0/virtio3/block/vda"),
            Transport::Virtio
        );
        assert_eq!(t("/sys/devices/platform/foo/block/sdz"), Transport::Other);
        // "usbmon" or "data" are not transports.
        assert_eq!(t("/sys/devices/x/usbmon/data/block/sdq"), Transport::Other);
    }

    /// A fake /sys with an NVMe disk, a SATA disk and a USB stick whose first partition is the
    /// imprint ESP.
    fn fake_sys() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        let devices = s.join("devices/pci0000:00");
        let disks = [
            (
                "nvme0n1",
                "0000:00:04.0/nvme/nvme0/nvme0n1",
                "0000:00:04.0/nvme/nvme0",
                41_943_040u64,
            ),
            (
                "sda",
                "0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
                "0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
                20_971_520,
            ),
            (
                "sdb",
                "0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb",
                "0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0",
                204_800,
            ),
        ];
        fs::create_dir_all(s.join("block")).unwrap();
        fs::create_dir_all(s.join("class/block")).unwrap();
        for (name, rel, device, sectors) in disks {
            let d = devices.join(rel);
            write(&d.join("size"), &format!("{sectors}\n"));
            write(
                &d.join("uevent"),
                &format!("DEVNAME={name}\nDEVTYPE=disk\n"),
            );
            std::os::unix::fs::symlink(&d, s.join("block").join(name)).unwrap();
            std::os::unix::fs::symlink(&d, s.join("class/block").join(name)).unwrap();
            std::os::unix::fs::symlink(devices.join(device), d.join("device")).unwrap();
        }
        write(
            &devices.join("0000:00:04.0/nvme/nvme0/model"),
            "QEMU NVMe Ctrl  \n",
        );
        write(
            &devices.join("0000:00:04.0/nvme/nvme0/serial"),
            "NVME0001\n",
        );
        let sata = devices.join("0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0");
        write(&sata.join("model"), "QEMU HARDDISK\n");
        fs::write(sata.join("vpd_pg80"), b"\x00\x80\x00\x08SATA0001").unwrap();
        write(&devices.join("0000:00:05.0/usb2/2-1/serial"), "STICK0001\n");
        let usb = devices.join("0000:00:05.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0");
        write(&usb.join("model"), "QEMU USB HARDDRIVE\n");
        let part = usb.join("block/sdb/sdb1");
        write(
            &part.join("uevent"),
            "MAJOR=8\nMINOR=17\nDEVNAME=sdb1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=IMPRINT\n",
        );
        std::os::unix::fs::symlink(&part, s.join("class/block/sdb1")).unwrap();
        dir
    }

    #[test]
    fn block_devices_reads_size_model_serial_transport() {
        let sys = fake_sys();
        let disks = block_devices(sys.path());
        let rows: Vec<_> = disks
            .iter()
            .map(|d| {
                (
                    d.name.as_str(),
                    d.size_bytes,
                    d.model.as_str(),
                    d.serial.as_str(),
                    d.transport,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "nvme0n1",
                    41_943_040 * 512,
                    "QEMU NVMe Ctrl",
                    "NVME0001",
                    Transport::Nvme
                ),
                (
                    "sda",
                    20_971_520 * 512,
                    "QEMU HARDDISK",
                    "SATA0001",
                    Transport::Sata
                ),
                (
                    "sdb",
                    204_800 * 512,
                    "QEMU USB HARDDRIVE",
                    "STICK0001",
                    Transport::Usb
                ),
            ]
        );
        let esp = find_esp(
            sys.path(),
            Path::new("/nonexistent"),
            "12345678-aaaa-bbbb-cccc-1234567890ab",
        )
        .unwrap();
        assert_eq!(
            esp,
            EspPartition {
                partition: "sdb1".into(),
                disk: "sdb".into()
            }
        );
        let table = format_disk_table(&disks, Some(&esp));
        assert!(
            table[1].starts_with("nvme0n1")
                && table[1].contains("20.0 GiB")
                && table[1].contains(" nvme ")
        );
        assert!(table[3].ends_with("imprint stick"), "{}", table[3]);
        assert_eq!(count_by_transport(&disks)[&Transport::Usb], 1);
    }

    #[test]
    fn esp_is_found_by_partuuid_first() {
        let sys = fake_sys();
        let dev = tempfile::tempdir().unwrap();
        let part = sys.path().join("class/block/sdb1/uevent");
        let uevent = fs::read_to_string(&part).unwrap();
        fs::write(
            &part,
            format!("{uevent}PARTUUID=12345678-aaaa-bbbb-cccc-1234567890ab\n"),
        )
        .unwrap();
        assert_eq!(
            find_esp(
                sys.path(),
                dev.path(),
                "12345678-AAAA-bbbb-cccc-1234567890ab"
            )
            .unwrap()
            .disk,
            "sdb"
        );
        // A partition named IMPRINT with another PARTUUID is some other stick: not ours.
        assert_eq!(
            find_esp(
                sys.path(),
                dev.path(),
                "00000000-0000-0000-0000-000000000000"
            ),
            None
        );
        let sys2 = fake_sys();
        fs::remove_file(sys2.path().join("class/block/sdb1")).unwrap();
        assert_eq!(find_esp(sys2.path(), dev.path(), "x"), None);
    }

    /// A disk image whose GPT has partition 1 with the given unique GUID (raw bytes), with
    /// `sector`-byte sectors.
    fn gpt_disk(path: &Path, sector: u64, guid: [u8; 16]) {
        let mut disk = vec![0u8; (sector * 40) as usize];
        let h = sector as usize;
        disk[h..h + 8].copy_from_slice(b"EFI PART");
        disk[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 2 * sector as usize;
        disk[e + 16..e + 32].copy_from_slice(&guid);
        fs::write(path, disk).unwrap();
    }

    #[test]
    fn esp_guid_is_read_from_the_gpt_when_uevent_lacks_it() {
        // 12345678-aaaa-bbbb-cccc-1234567890ab as GPT stores it (mixed endian).
        let guid = [
            0x78, 0x56, 0x34, 0x12, 0xaa, 0xaa, 0xbb, 0xbb, 0xcc, 0xcc, 0x12, 0x34, 0x56, 0x78,
            0x90, 0xab,
        ];
        for sector in [512u64, 4096] {
            let sys = fake_sys();
            write(
                &sys.path().join("block/sdb/queue/logical_block_size"),
                &format!("{sector}\n"),
            );
            let dev = tempfile::tempdir().unwrap();
            gpt_disk(&dev.path().join("sdb"), sector, guid);
            let uuid = "12345678-aaaa-bbbb-cccc-1234567890ab";
            assert_eq!(
                gpt_partition_guid(&dev.path().join("sdb"), sector, 1).as_deref(),
                Some(uuid)
            );
            let esp = find_esp(sys.path(), dev.path(), &uuid.to_uppercase()).unwrap();
            assert_eq!((esp.partition.as_str(), esp.disk.as_str()), ("sdb1", "sdb"));
            // Its GUID is known and differs: the name IMPRINT does not make it ours.
            assert_eq!(
                find_esp(
                    sys.path(),
                    dev.path(),
                    "00000000-0000-0000-0000-000000000001"
                ),
                None
            );
            assert_eq!(gpt_partition_guid(&dev.path().join("sdb"), sector, 2), None);
            assert_eq!(
                gpt_partition_guid(&dev.path().join("sdb"), sector, 129),
                None
            );
        }
    }

    #[test]
    fn esp_falls_back_to_a_unique_imprint_name_when_no_guid_is_readable() {
        let sys = fake_sys();
        let dev = tempfile::tempdir().unwrap();
        let esp = find_esp(
            sys.path(),
            dev.path(),
            "12345678-aaaa-bbbb-cccc-1234567890ab",
        );
        assert_eq!(esp.unwrap().disk, "sdb");
    }

    #[test]
    fn console_names_are_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("class/tty/console/active"), "tty0 ttyS0\n");
        assert_eq!(Consoles::names(dir.path()), ["tty0", "ttyS0"]);
        write(&dir.path().join("class/tty/console/active"), "ttyS0 tty1\n");
        assert_eq!(Consoles::names(dir.path()), ["ttyS0", "tty1"]);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Consoles::names(empty.path()), ["tty0", "ttyS0"]);
    }

    #[test]
    fn consoles_write_every_line_to_every_output() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("tty0"), "").unwrap();
        fs::write(dev.join("ttyS0"), "").unwrap();
        let mut c = Consoles::open(&dir.path().join("sys"), &dev);
        assert_eq!(c.active(), ["tty0", "ttyS0"]);
        c.line("IMPRINT-BOOT-OK");
        for name in ["tty0", "ttyS0"] {
            assert_eq!(
                fs::read_to_string(dev.join(name)).unwrap(),
                "IMPRINT-BOOT-OK\r\n"
            );
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(20 << 30), "20.0 GiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
    }
}
