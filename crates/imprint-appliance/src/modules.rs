//! Kernel modules without udev or modprobe: the `depmod` indexes, fnmatch of device
//! `modalias`es against `modules.alias`, load order with hard and soft dependencies, and
//! `finit_module(2)` behind a trait so the order is tested without a kernel.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::kmod::{finit_module, ModuleInitFlags};

use crate::boot::{BootError, Cmdline};
use crate::fnmatch::glob_match;

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
/// kernel. Called from several threads at once (independent modules load in parallel).
pub trait InsertModule: Sync {
    /// Inserts the module file at `path` with `params` (space-separated `name=value`).
    fn insert(&self, path: &Path, params: &str) -> io::Result<()>;
}

/// `finit_module(2)` on the module file.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelInsert;

impl InsertModule for KernelInsert {
    fn insert(&self, path: &Path, params: &str) -> io::Result<()> {
        let file = File::open(path)?;
        let params = CString::new(params)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in parameters"))?;
        finit_module(&file, &params, ModuleInitFlags::empty()).map_err(io::Error::from)
    }
}

/// How many modules are inserted at once: one per CPU, at least two (so that one driver
/// waiting for its controller does not hold up the rest) and at most eight. More than one per
/// CPU was measured to slow the boot (`scripts/bench-boot`: eight insertions on two vCPUs
/// started the USB controller's driver 2 s later): module init is mostly CPU work, and what
/// the disks wait for then waits for unrelated drivers.
pub fn load_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Whether a device with `modalias` is one the install waits for — a storage controller
/// (PCI class 01), a USB host controller (PCI class 0c03), a USB mass-storage interface
/// (interface class 08) or a SCSI disk — so that its driver goes before everything else
/// ([`ModuleLoader::queue_first`]).
pub fn is_storage_path(modalias: &str) -> bool {
    let field = |prefix: &str, key: &str| -> Option<String> {
        let rest = modalias.strip_prefix(prefix)?;
        let at = rest.find(key)? + key.len();
        rest.get(at..at + 2).map(str::to_ascii_lowercase)
    };
    if modalias.starts_with("pci:") {
        return match field("pci:", "bc").as_deref() {
            Some("01") => true,
            Some("0c") => field("pci:", "sc").as_deref() == Some("03"),
            _ => false,
        };
    }
    if modalias.starts_with("usb:") {
        return field("usb:", "ic").as_deref() == Some("08");
    }
    modalias == "scsi:t-0x00"
}

/// Loads modules with their dependencies, each at most once, remembering what failed.
///
/// Modules are queued ([`ModuleLoader::queue`]) at any time and inserted by worker threads
/// while [`ModuleLoader::run`] runs, each as soon as every module it needs has finished: a
/// module queued late (a USB disk's driver, found once the USB controller's driver made the
/// disk appear) does not wait for unrelated modules queued before it.
#[derive(Debug)]
pub struct ModuleLoader<I> {
    index: ModuleIndex,
    params: HashMap<String, Vec<String>>,
    inserter: I,
    schedule: Mutex<Schedule>,
    /// Signalled when a module is queued or becomes ready, an insertion finishes, or a run
    /// closes.
    changed: Condvar,
    /// Worker threads per [`ModuleLoader::run`] ([`load_threads`] unless set).
    threads: usize,
}

/// Every module queued so far and where each stands: the workers' shared state.
#[derive(Debug, Default)]
struct Schedule {
    /// Every name queued: the modules of `plan` and names that resolved to nothing.
    attempted: HashSet<String>,
    /// Every module queued, in a valid sequential load order: each queued module's
    /// [`ModuleIndex::load_order`] appended, each module once. A module waits only for
    /// modules before it here ([`ModuleIndex::prerequisites`]), so a softdep cycle cannot
    /// deadlock, and a module queued earlier never waits for one queued later.
    plan: Vec<String>,
    /// Per plan item: its prerequisites that have not finished yet.
    waiting_on: Vec<usize>,
    /// Per plan item: the later items waiting for it.
    dependents: Vec<Vec<usize>>,
    /// Per plan item: its insertion finished (whatever the result).
    done: Vec<bool>,
    /// Items whose prerequisites have all finished, not started yet, keyed by
    /// ([`Schedule::rank`], position): the storage path's first, then the earliest.
    ready: BTreeSet<(u8, usize)>,
    /// Per plan item: it is on the storage path ([`ModuleLoader::queue_first`]).
    first: Vec<bool>,
    /// Plan position of each module queued.
    position: HashMap<String, usize>,
    running: usize,
    /// Insertions finished so far.
    finished: usize,
    last_finished: Option<Instant>,
    /// The run is ending: workers leave once everything queued has finished.
    closed: bool,
    /// Modules inserted (or found already present), in the order their insertion finished.
    loaded: Vec<String>,
    failures: Vec<(String, String)>,
}

impl Schedule {
    /// The order key of plan item `i` among ready items: 0 for the storage path, 1 after.
    fn rank(&self, i: usize) -> u8 {
        u8::from(!self.first[i])
    }

    /// Every module queued has finished. (Nothing ready and nothing running means the same:
    /// the earliest unfinished module waits for nothing, so it is ready or running.)
    fn idle(&self) -> bool {
        self.finished == self.plan.len()
    }

    fn finish(&mut self, i: usize, result: Result<(), String>) {
        self.running -= 1;
        self.done[i] = true;
        self.finished += 1;
        self.last_finished = Some(Instant::now());
        match result {
            Ok(()) => self.loaded.push(self.plan[i].clone()),
            Err(why) => self.failures.push((self.plan[i].clone(), why)),
        }
        for d in std::mem::take(&mut self.dependents[i]) {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 {
                self.ready.insert((self.rank(d), d));
            }
        }
    }
}

/// Where the insertions stand ([`ModuleLoader::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Insertions finished so far.
    pub finished: usize,
    /// Every module queued has finished.
    pub idle: bool,
}

impl<I: InsertModule> ModuleLoader<I> {
    pub fn new(index: ModuleIndex, params: HashMap<String, Vec<String>>, inserter: I) -> Self {
        ModuleLoader {
            index,
            params,
            inserter,
            schedule: Mutex::new(Schedule::default()),
            changed: Condvar::new(),
            threads: load_threads(),
        }
    }

    /// The same loader inserting at most `threads` modules at once.
    #[cfg(test)]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Schedule> {
        // A worker that panicked left the schedule as consistent as any other state.
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The module names every modalias in `modaliases` matches, in order, each once.
    pub fn modules_for_aliases<'a>(
        &self,
        modaliases: impl IntoIterator<Item = &'a String>,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for alias in modaliases {
            for m in self.index.modules_for_alias(alias) {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        out
    }

    /// Whether a driver for a device with `modalias` is there or coming: a module claims it
    /// that is built in, or has not failed (not tried yet, queued, loading or loaded). False
    /// when none claims it or every one that does failed to load: then the device will not
    /// get a driver from us.
    pub fn driver_expected(&self, modalias: &str) -> bool {
        let s = self.lock();
        self.index
            .modules_for_alias(modalias)
            .iter()
            .any(|m| self.index.is_builtin(m) || !s.failures.iter().any(|(failed, _)| failed == m))
    }

    /// Queues every module in `names` (names or aliases) with what each needs, each module
    /// once over the loader's life, and returns how many modules it queued. They are inserted
    /// while [`ModuleLoader::run`] runs (at once if it does): a module only after every module
    /// it needs (hard dependencies, soft pre-dependencies) has finished, a soft
    /// post-dependency only after its module, whether those were queued now or earlier;
    /// modules that do not need each other load at the same time. A module whose dependency
    /// failed is still tried (it then fails itself).
    pub fn queue<S: AsRef<str>>(&self, names: &[S]) -> usize {
        self.queue_ranked(names, false)
    }

    /// Like [`ModuleLoader::queue`], for what the disks wait for: these modules and what they
    /// need go before every module queued with [`ModuleLoader::queue`] that has not started,
    /// whenever that was queued (a dependency both share is moved up too).
    pub fn queue_first<S: AsRef<str>>(&self, names: &[S]) -> usize {
        self.queue_ranked(names, true)
    }

    fn queue_ranked<S: AsRef<str>>(&self, names: &[S], first: bool) -> usize {
        let mut guard = self.lock();
        let s = &mut *guard;
        let from = s.plan.len();
        for name in names {
            let name = name.as_ref();
            let modules = self.index.resolve(name);
            if modules.is_empty() {
                let name = normalize(name);
                if s.attempted.insert(name.clone()) {
                    s.failures
                        .push((name, "not in modules.dep or modules.alias".into()));
                }
                continue;
            }
            for module in modules {
                if self.index.is_builtin(&module) {
                    continue;
                }
                for m in self.index.load_order(&module) {
                    if s.attempted.insert(m.clone()) {
                        s.position.insert(m.clone(), s.plan.len());
                        s.plan.push(m);
                        s.first.push(first);
                    } else if let Some(&i) = s.position.get(&m).filter(|_| first) {
                        // Queued before, not for the disks: it is now.
                        if !s.first[i] {
                            s.first[i] = true;
                            if s.ready.remove(&(1, i)) {
                                s.ready.insert((0, i));
                            }
                        }
                    }
                }
            }
        }
        let prereqs = self.index.prerequisites(&s.plan);
        for (i, pre) in prereqs.iter().enumerate().skip(from) {
            let unfinished: Vec<usize> = pre.iter().copied().filter(|&p| !s.done[p]).collect();
            for &p in &unfinished {
                s.dependents[p].push(i);
            }
            s.waiting_on.push(unfinished.len());
            s.dependents.push(Vec::new());
            s.done.push(false);
            if unfinished.is_empty() {
                let rank = s.rank(i);
                s.ready.insert((rank, i));
            }
        }
        let queued = s.plan.len() - from;
        if queued > 0 {
            self.changed.notify_all();
        }
        queued
    }

    /// Runs `f` while [`ModuleLoader::threads`] worker threads insert what is queued, before
    /// or during `f`; returns `f`'s result once every module queued has finished.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        self.lock().closed = false;
        std::thread::scope(|scope| {
            let workers = (0..self.threads)
                .filter(|_| {
                    std::thread::Builder::new()
                        .name("insmod".into())
                        .spawn_scoped(scope, || self.work())
                        .is_ok()
                })
                .count();
            let result = {
                // Closes the run however `f` ends, so that the workers leave and the scope
                // can join them.
                let _close = CloseOnDrop(self);
                f()
            };
            if workers == 0 {
                // No thread could be started: insert everything here, one at a time.
                self.work();
            }
            result
        })
    }

    /// Where the insertions stand.
    pub fn progress(&self) -> Progress {
        let s = self.lock();
        Progress {
            finished: s.finished,
            idle: s.idle(),
        }
    }

    /// Waits until more than `finished` insertions have finished (a [`Progress::finished`]
    /// seen before), or `timeout` passed.
    pub fn wait_for_progress(&self, finished: usize, timeout: Duration) {
        let s = self.lock();
        let (_s, _timed_out) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.finished <= finished)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// When the last insertion finished.
    pub fn last_finished(&self) -> Option<Instant> {
        self.lock().last_finished
    }

    /// Modules inserted (or found already present), in the order their insertion finished.
    pub fn loaded(&self) -> Vec<String> {
        self.lock().loaded.clone()
    }

    /// Modules that could not be loaded, with why, in the order they failed.
    pub fn failures(&self) -> Vec<(String, String)> {
        self.lock().failures.clone()
    }

    /// A worker: inserts ready modules until the run closes and everything queued finished.
    fn work(&self) {
        let mut s = self.lock();
        loop {
            if let Some((_, i)) = s.ready.pop_first() {
                s.running += 1;
                let module = s.plan[i].clone();
                drop(s);
                let result = self.insert(&module);
                s = self.lock();
                s.finish(i, result);
                self.changed.notify_all();
            } else if s.closed && s.running == 0 {
                return;
            } else {
                s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    fn insert(&self, module: &str) -> Result<(), String> {
        let Some(path) = self.index.path(module) else {
            return Err("not in modules.dep".to_string());
        };
        let params = self
            .params
            .get(module)
            .map(|p| p.join(" "))
            .unwrap_or_default();
        match self.inserter.insert(&path, &params) {
            // Already there: loaded earlier by someone else (or built in after all).
            Err(e) if e.raw_os_error() != Some(nix::libc::EEXIST) => Err(e.to_string()),
            _ => Ok(()),
        }
    }
}

/// Ends a [`ModuleLoader::run`]: the workers leave once everything queued has finished.
struct CloseOnDrop<'a, I>(&'a ModuleLoader<I>);

impl<I> Drop for CloseOnDrop<'_, I> {
    fn drop(&mut self) {
        self.0
            .schedule
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.0.changed.notify_all();
    }
}

impl ModuleIndex {
    /// For each module of `plan` (a valid sequential load order), the indexes of the earlier
    /// modules of `plan` it must wait for: its hard dependencies, its soft pre-dependencies,
    /// and the modules naming it as a soft post-dependency.
    pub fn prerequisites(&self, plan: &[String]) -> Vec<Vec<usize>> {
        let pos: HashMap<&str, usize> = plan
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_str(), i))
            .collect();
        let mut out: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); plan.len()];
        let mut edge = |before: &str, after: &str| {
            if let (Some(&b), Some(&a)) = (pos.get(before), pos.get(after)) {
                // Only edges the sequential order agrees with: cycles (softdeps can form them)
                // were already broken there.
                if b < a {
                    out[a].insert(b);
                }
            }
        };
        for m in plan {
            if let Some((_, deps)) = self.deps.get(m) {
                for d in deps {
                    edge(d, m);
                }
            }
            let (pre, post) = self.softdeps.get(m).cloned().unwrap_or_default();
            for name in &pre {
                for p in self.resolve(name) {
                    edge(&p, m);
                }
            }
            for name in &post {
                for p in self.resolve(name) {
                    edge(m, &p);
                }
            }
        }
        out.into_iter().map(|s| s.into_iter().collect()).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Queues `names` and runs the loader until every module queued has finished.
    fn load_all<I: InsertModule, S: AsRef<str>>(loader: &ModuleLoader<I>, names: &[S]) {
        loader.queue(names);
        loader.run(|| ());
    }

    /// Loads a module (by name or alias) and what it needs; false if it, or a hard dependency
    /// of it, could not be loaded.
    fn load<I: InsertModule>(loader: &ModuleLoader<I>, name: &str) -> bool {
        load_all(loader, &[name]);
        let modules = loader.index.resolve(name);
        let loaded = loader.loaded();
        !modules.is_empty()
            && modules
                .iter()
                .all(|m| loader.index.is_builtin(m) || loaded.contains(m))
    }

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

    /// Records every insertion with when it started and ended (one global sequence), so the
    /// tests can check that a module started only after what it needs had finished.
    #[derive(Default)]
    struct Recorder {
        /// (module, params, start seq, end seq), in the order insertions finished.
        calls: Mutex<Vec<(String, String, usize, usize)>>,
        seq: std::sync::atomic::AtomicUsize,
        refuse: Vec<&'static str>,
        /// `(a, b)`: inserting `a` waits (up to 5 s) until `b` has started; only a loader
        /// that runs them at the same time lets `a` see that.
        rendezvous: Option<(&'static str, &'static str)>,
        started: Mutex<Vec<String>>,
        met: std::sync::atomic::AtomicBool,
        /// Inserting this module takes this long (a slow controller's driver).
        hold: Option<(&'static str, Duration)>,
    }

    impl Recorder {
        fn tick(&self) -> usize {
            self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        }

        fn names(&self) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|c| c.0.clone())
                .collect()
        }

        fn span(&self, module: &str) -> (usize, usize) {
            let calls = self.calls.lock().unwrap();
            let c = calls.iter().find(|c| c.0 == module).unwrap();
            (c.2, c.3)
        }
    }

    impl InsertModule for &Recorder {
        fn insert(&self, path: &Path, params: &str) -> io::Result<()> {
            let name = module_name(&path.to_string_lossy());
            let start = self.tick();
            self.started.lock().unwrap().push(name.clone());
            if let Some((a, b)) = self.rendezvous {
                if name == a {
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_secs(5) {
                        if self.started.lock().unwrap().iter().any(|s| s == b) {
                            self.met.store(true, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
            // Long enough that a loader ignoring dependencies would be caught overlapping.
            std::thread::sleep(std::time::Duration::from_millis(10));
            if let Some((slow, time)) = self.hold {
                if name == slow {
                    std::thread::sleep(time);
                }
            }
            if self.refuse.contains(&name.as_str()) {
                return Err(io::Error::from_raw_os_error(nix::libc::ENODEV));
            }
            let end = self.tick();
            self.calls
                .lock()
                .unwrap()
                .push((name, params.to_owned(), start, end));
            Ok(())
        }
    }

    /// Every module in `names` started after each module it needs (hard dependencies, soft
    /// pre-dependencies present in the recording) had finished.
    fn assert_deps_finished_first(index: &ModuleIndex, rec: &Recorder) {
        let names = rec.names();
        let prereqs = index.prerequisites(&names);
        for (i, module) in names.iter().enumerate() {
            let (start, _) = rec.span(module);
            for &p in &prereqs[i] {
                let (_, end) = rec.span(&names[p]);
                assert!(
                    end < start,
                    "{module} started ({start}) before {} finished ({end})",
                    names[p]
                );
            }
            // The hard dependencies, whatever the order of the recording.
            for dep in &index.deps[module].1 {
                if names.contains(dep) {
                    let (_, end) = rec.span(dep);
                    assert!(end < start, "{module} started before its dependency {dep}");
                }
            }
        }
    }

    #[test]
    fn loader_loads_once_with_params_and_records_failures() {
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let rec = Recorder {
            refuse: vec!["crc32c_intel"],
            ..Default::default()
        };
        let params = module_params(&Cmdline::parse(
            "quiet usb-storage.quirks=0bc2:3312:u imprint.esp=x",
        ));
        {
            let loader = ModuleLoader::new(index.clone(), params, &rec);
            let mods = loader.modules_for_aliases(&[
                "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30".to_string(),
                "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00".to_string(),
            ]);
            assert_eq!(mods, ["xhci_pci", "usb_storage"]);
            load_all(&loader, &mods);
            assert!(load(&loader, "ext4"));
            assert!(load(&loader, "atkbd"));
            assert!(!load(&loader, "no_such_module"));
            assert!(load(&loader, "usb_storage"));
            assert_eq!(
                loader.failures(),
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
        let mut names = rec.names();
        assert_deps_finished_first(&index, &rec);
        names.sort();
        assert_eq!(
            names,
            [
                "crc32c_generic",
                "ext4",
                "jbd2",
                "usb_storage",
                "usbcore",
                "xhci_hcd",
                "xhci_pci",
            ]
        );
        let calls = rec.calls.lock().unwrap();
        let params_of = |m: &str| calls.iter().find(|c| c.0 == m).unwrap().1.clone();
        assert_eq!(params_of("usb_storage"), "delay_use=0 quirks=0bc2:3312:u");
        assert_eq!(params_of("usbcore"), "");
    }

    #[test]
    fn parallel_loader_runs_independent_modules_together_and_dependents_after() {
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        // nvme's chain and the USB chain share nothing: jbd2 (ext4's dependency) waits until
        // usbcore has started, which only a loader running both chains at once allows.
        let rec = Recorder {
            rendezvous: Some(("jbd2", "usbcore")),
            ..Default::default()
        };
        let loader = ModuleLoader::new(index.clone(), HashMap::new(), &rec);
        load_all(
            &loader,
            &["nvme", "ext4", "usb_storage", "xhci_pci", "sd_mod"],
        );
        assert!(loader.failures().is_empty(), "{:?}", loader.failures());
        assert!(
            rec.met.load(std::sync::atomic::Ordering::SeqCst),
            "jbd2 and usbcore never loaded at the same time"
        );
        let names = rec.names();
        assert_eq!(names.len(), 16, "{names:?}");
        assert_deps_finished_first(&index, &rec);
        // The soft pre-dependencies too: crc_t10dif after crct10dif_generic, ext4 after both
        // crc32c modules.
        let before = |a: &str, b: &str| rec.span(a).1 < rec.span(b).0;
        assert!(before("crct10dif_generic", "crc_t10dif"));
        assert!(before("crc32c_generic", "ext4") && before("crc32c_intel", "ext4"));
        assert!(before("nvme_core", "nvme") && before("t10_pi", "nvme_core"));
        assert!(before("usbcore", "xhci_hcd") && before("xhci_hcd", "xhci_pci"));
        assert_eq!(loader.loaded().len(), 16);
    }

    /// Waits (at most 5 s) until `module` has finished loading, as coldplug waits for
    /// progress between passes.
    fn wait_until_loaded<I: InsertModule>(loader: &ModuleLoader<I>, module: &str) {
        let t = Instant::now();
        while !loader.loaded().iter().any(|m| m == module) && t.elapsed() < Duration::from_secs(5) {
            let p = loader.progress();
            loader.wait_for_progress(p.finished, Duration::from_millis(50));
        }
    }

    #[test]
    fn a_module_queued_later_starts_while_an_earlier_one_is_still_loading() {
        // Coldplug's case: ext4 (the first pass) loads slowly; usb_storage is found only once
        // xhci_pci has loaded and the USB disk appeared. It must not wait for ext4: ext4's
        // insertion waits until usb_storage has started, which only then happens.
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let rec = Recorder {
            rendezvous: Some(("ext4", "usb_storage")),
            ..Default::default()
        };
        let loader = ModuleLoader::new(index.clone(), HashMap::new(), &rec);
        assert_eq!(loader.queue(&["ext4", "xhci_pci"]), 7);
        loader.run(|| {
            wait_until_loaded(&loader, "xhci_pci");
            assert!(!loader.progress().idle, "ext4 should still be loading");
            assert_eq!(loader.queue(&["usb_storage", "xhci_pci"]), 1);
        });
        assert!(
            rec.met.load(std::sync::atomic::Ordering::SeqCst),
            "usb_storage waited for ext4"
        );
        assert!(rec.span("usb_storage").0 < rec.span("ext4").1);
        assert_deps_finished_first(&index, &rec);
        assert!(loader.progress().idle && loader.failures().is_empty());
        assert_eq!(loader.loaded().len(), 8);
    }

    #[test]
    fn a_module_queued_later_waits_for_its_dependency_still_loading() {
        // usbcore (queued with xhci_pci) is slow; usb_storage, queued while it loads, needs it.
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let rec = Recorder {
            hold: Some(("usbcore", Duration::from_millis(300))),
            ..Default::default()
        };
        let loader = ModuleLoader::new(index.clone(), HashMap::new(), &rec);
        loader.queue(&["xhci_pci"]);
        loader.run(|| {
            let t = Instant::now();
            while !rec.started.lock().unwrap().iter().any(|m| m == "usbcore")
                && t.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(loader.queue(&["usb_storage"]), 1);
        });
        assert!(rec.span("usbcore").1 < rec.span("usb_storage").0);
        assert_deps_finished_first(&index, &rec);
        assert_eq!(rec.names().len(), 4);
    }

    #[test]
    fn the_storage_path_goes_first_and_moves_a_shared_dependency_up() {
        // One insertion at a time (the scarce case): ext4 and usb_storage were queued first,
        // then the USB controller's driver for the disks. It goes before them, and usbcore —
        // queued earlier for usb_storage — moves up with it.
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let rec = Recorder::default();
        let loader = ModuleLoader::new(index.clone(), HashMap::new(), &rec).with_threads(1);
        assert_eq!(loader.queue(&["ext4", "usb_storage"]), 6);
        assert_eq!(
            loader.queue_first(&["pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30"]),
            2
        );
        loader.run(|| ());
        let names = rec.names();
        assert_eq!(names[..3], ["usbcore", "xhci_hcd", "xhci_pci"], "{names:?}");
        // The rest in the order it was queued, each after what it needs.
        assert_eq!(
            names[3..],
            [
                "crc32c_generic",
                "crc32c_intel",
                "jbd2",
                "ext4",
                "usb_storage"
            ],
            "{names:?}"
        );
        assert_deps_finished_first(&index, &rec);
    }

    #[test]
    fn storage_and_usb_controllers_usb_disks_and_scsi_disks_are_the_storage_path() {
        for (alias, storage) in [
            (
                "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02",
                true,
            ), // NVMe
            (
                "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01",
                true,
            ), // AHCI
            (
                "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30",
                true,
            ), // xHCI
            (
                "pci:v00008086d000024CDsv00001AF4sd00001100bc0Csc03i20",
                true,
            ), // EHCI
            (
                "pci:v00008086d00008C22sv00001AF4sd00001100bc0Csc05i00",
                false,
            ), // SMBus
            (
                "pci:v00001234d00001111sv00001AF4sd00001100bc03sc00i00",
                false,
            ), // VGA
            (
                "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00",
                false,
            ), // NIC
            ("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00", true), // USB disk
            ("usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip01in00", false), // keyboard
            ("scsi:t-0x00", true),
            ("scsi:t-0x05", false),
            ("acpi:PNP0303:", false),
            ("pci:", false),
        ] {
            assert_eq!(is_storage_path(alias), storage, "{alias}");
        }
    }

    #[test]
    fn a_soft_post_dependency_loads_after_its_module() {
        // a post: p — queuing a brings p along, to start once a has finished.
        let dir = fake_modules();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/a.ko:\nkernel/p.ko:\n",
        )
        .unwrap();
        fs::write(dir.path().join("modules.softdep"), "softdep a post: p\n").unwrap();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let rec = Recorder {
            hold: Some(("a", Duration::from_millis(100))),
            ..Default::default()
        };
        let loader = ModuleLoader::new(index, HashMap::new(), &rec);
        assert_eq!(loader.queue(&["a"]), 2);
        loader.run(|| assert_eq!(loader.queue(&["p"]), 0));
        assert_eq!(rec.names(), ["a", "p"]);
        assert!(rec.span("a").1 < rec.span("p").0);
    }

    #[test]
    fn driver_expected_until_every_claiming_module_failed() {
        let dir = fake_modules();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let rec = Recorder {
            refuse: vec!["xhci_pci"],
            ..Default::default()
        };
        let loader = ModuleLoader::new(index, HashMap::new(), &rec);
        let xhci = "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30";
        // Not tried yet, then queued: coming.
        assert!(loader.driver_expected(xhci));
        loader.queue(&["xhci_pci"]);
        assert!(loader.driver_expected(xhci));
        loader.run(|| ());
        assert!(!loader.driver_expected(xhci));
        assert!(!loader.driver_expected("pci:v00008086bcFF"));
    }

    #[test]
    fn prerequisites_only_point_backwards_so_softdep_cycles_cannot_deadlock() {
        let dir = fake_modules();
        // a pre: b and b pre: a — a cycle the sequential order broke.
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/a.ko:\nkernel/b.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.softdep"),
            "softdep a pre: b\nsoftdep b pre: a\n",
        )
        .unwrap();
        let index = ModuleIndex::load(dir.path()).unwrap();
        let plan = index.load_order("a");
        assert_eq!(plan, ["b", "a"]);
        assert_eq!(index.prerequisites(&plan), [vec![], vec![0]]);
        let rec = Recorder::default();
        let loader = ModuleLoader::new(index, HashMap::new(), &rec);
        assert!(load(&loader, "a"));
        assert_eq!(rec.names(), ["b", "a"]);
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
}
