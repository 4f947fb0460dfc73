//! Kernel modules without udev or modprobe: the `depmod` indexes, fnmatch of device
//! `modalias`es against `modules.alias`, load order with hard and soft dependencies, and
//! `finit_module(2)` behind a trait so the order is tested without a kernel.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

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
