//! guard: an XDP connection guard and the daemon that runs it.
//!
//! Where things happen, following a SYN from the wire:
//!
//! - `guard-ebpf` (a separate crate) is the XDP program: it parses each
//!   frame, and `judge_syn` judges SYNs to protected listeners against the
//!   deny/allow tries and charges the source's, the tenant's and the
//!   host's token buckets (tested in `tests/tests/xdp_kernel.rs` under
//!   the real verifier, and live in `tests/tests/e2e_xdp.rs`).
//! - [`daemon`] is `guard run`: it starts the proxy and the XDP side in
//!   one process and feeds logins back into XDP's source→tenant map.
//! - [`ebpf`] loads that program, attaches and pins it ([`ebpf::XdpGuard`]),
//!   and holds typed handles on its maps ([`ebpf::maps::GuardMaps`]);
//!   [`ebpf::settings`] turns a configuration into map values,
//!   [`ebpf::control`] keeps the maps in step with the configuration, and
//!   [`ebpf::events`] turns the program's limit events and counters into a
//!   few summary lines per interval and the heaviest sources.
//! - [`config`] is the TOML file and its validation (a leaf: it knows no
//!   other module but [`cidr`] and [`password`]), [`cli`] the flags that
//!   override it, [`cidr`] the prefixes both use, [`paths`] every pin and
//!   state location, [`shutdown`] the signals.
//! - [`ctl`] holds the operator commands that act on a running guard's
//!   pinned state (`guard xdp status`, `guard deny add`, …);
//!   [`proxy::probe`] is `guard probe`, which checks memcached nodes
//!   before they serve.
//!
//! Following a memcache request:
//!
//! - [`protocol`] parses and encodes the text, meta and binary protocols,
//!   zero-copy, with limits set up front; [`protocol::reader`] is the one
//!   loop that turns a byte stream into requests, for the proxy, the
//!   property tests and the fuzz targets alike.
//! - [`proxy`] is the memcache proxy: [`proxy::listener`] accepts under
//!   connection caps, [`proxy::session`] serves one client (after
//!   [`proxy::auth`] when tenants are configured) as a state machine that
//!   ends with a counted reason, reading it through
//!   [`proxy::connection`]; [`descriptors`] fits the
//!   connection cap to the descriptor limit, [`proxy::command`]
//!   translates requests to backend meta requests in the client's tenant
//!   namespace, [`proxy::router`] routes with [`proxy::ketama`] (as
//!   twemproxy does) over the ring in force, and [`proxy::backend`]
//!   pipelines over pooled backend connections, a window ahead of the
//!   replies, taking what waits from a queue per tenant in turn
//!   ([`proxy::fair`]; tested in `guard/tests/proxy_noisy_neighbour.rs`),
//!   and reporting each answer's latency and each failure to
//!   [`proxy::health`].
//! - [`proxy::ejection`] is where a backend is judged: it ejects one that
//!   keeps failing or is a latency outlier against its peers, re-admits
//!   it once [`proxy::probe`] (also `guard probe`) passes, and probes
//!   backends a reload adds (tested in `guard/tests/proxy_ejection.rs`,
//!   with a delaying relay for the slow node).
//! - [`tenant`] knows who a client is and what it may touch: credentials
//!   and their verification, SASL and text authentication, per-tenant key
//!   namespaces with their own `flush_all`, and connection caps (charged
//!   in [`proxy::auth`]; tested in `guard/tests/proxy_tenants.rs`).
//! - [`tenant::budget`] is where a tenant is charged for its requests:
//!   GCRA buckets for requests and bytes per second and a count of
//!   backend requests in flight, per tenant, which
//!   [`proxy::command::dispatch`] charges before a request is sent and
//!   refuses at once when over (`SERVER_ERROR tenant over budget: …`);
//!   the reply's bytes are charged when it is ready (tested in
//!   `guard/tests/proxy_budgets.rs`, with the real binary for SIGHUP).
//!
//! The proxy's tests are `guard/tests/proxy_*.rs` against real memcached;
//! the parsers' are `protocol::tests` (every split point, property tests)
//! and the fuzz targets in `guard/fuzz`.

pub mod admin;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod descriptors;
pub mod ebpf;
pub mod password;
pub mod paths;
pub mod protocol;
pub mod proxy;
pub mod shutdown;
pub mod tenant;

use anyhow::Context as _;

use crate::cli::{Cli, Command};

/// Runs the command the CLI names.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = cli.paths();
    match cli.command {
        Command::Run(args) => {
            // The config decides the runtime's shape; daemon::run reports
            // a bad config the same way again.
            let threads = args.resolve().map_or(0, |c| c.proxy.runtime_threads());
            let mut builder = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                tokio::runtime::Builder::new_multi_thread()
            };
            if threads > 1 {
                builder.worker_threads(threads);
            }
            let runtime = builder
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(daemon::run(paths, *args))
        }
        Command::Xdp(cmd) => ctl::xdp(&paths, cmd),
        Command::Deny(cmd) => ctl::cidr(&paths, ebpf::maps::CidrList::Deny, cmd),
        Command::Allow(cmd) => ctl::cidr(&paths, ebpf::maps::CidrList::Allow, cmd),
        Command::Verified(cmd) => ctl::verified(&paths, cmd),
        Command::Status(args) => admin::client::command(&paths, &args),
        Command::Probe(args) => {
            // A few sockets per node: one thread runs every probe.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(proxy::probe::command(&args))
        }
        Command::Tenant(cli::TenantCommand::HashPassword { iterations }) => {
            let hash = tenant::hash_password_from(&mut std::io::stdin().lock(), iterations)?;
            println!("{hash}");
            Ok(())
        }
    }
}
