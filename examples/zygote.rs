//! A zygote: a server that builds expensive state once and forks workers
//! that answer from it.
//!
//! The preload sieves the primes below 200 million (a 200 MB table and a few
//! seconds of work); workers `isprime` and `pi` answer queries from it, shared
//! copy-on-write, in a millisecond or so. `zygote query ...` does the same
//! work cold, in one process, the way a freshly exec'd program must.
//!
//! ```sh
//! cargo run --release --example zygote -- --socket /tmp/zygote.sock &   # preloads, then serves
//! cargo run --release -- spawn --socket /tmp/zygote.sock --worker pi -- 1000000
//! cargo run --release --example zygote -- query pi 1000000              # the cold path
//! ```
//!
//! `ZYGOTE_SIEVE_LIMIT` changes the table size (the tests use a small one).

use std::process::ExitCode;
use std::time::Instant;

use forkserver::server::Server;

const DEFAULT_LIMIT: usize = 200_000_000;
/// Numbers per block in the prefix counts that make `pi` fast.
const BLOCK: usize = 1 << 16;

/// Primality of every number below `limit`, plus prime counts per block.
struct Sieve {
    composite: Vec<bool>,
    primes_before_block: Vec<u64>,
}

impl Sieve {
    fn build(limit: usize) -> Sieve {
        let mut composite = vec![false; limit.max(2)];
        composite[0] = true;
        composite[1] = true;
        let mut n = 2;
        while n * n < limit {
            if !composite[n] {
                (n * n..limit).step_by(n).for_each(|m| composite[m] = true);
            }
            n += 1;
        }
        let mut primes_before_block = Vec::with_capacity(limit / BLOCK + 1);
        let mut count = 0;
        for block in composite.chunks(BLOCK) {
            primes_before_block.push(count);
            count += block.iter().filter(|&&c| !c).count() as u64;
        }
        Sieve {
            composite,
            primes_before_block,
        }
    }

    fn limit(&self) -> usize {
        self.composite.len()
    }

    fn is_prime(&self, n: usize) -> Option<bool> {
        self.composite.get(n).map(|&c| !c)
    }

    /// How many primes are ≤ n.
    fn pi(&self, n: usize) -> Option<u64> {
        if n >= self.limit() {
            return None;
        }
        let block = n / BLOCK;
        let partial = self.composite[block * BLOCK..=n]
            .iter()
            .filter(|&&c| !c)
            .count();
        Some(self.primes_before_block[block] + partial as u64)
    }
}

/// Answers `isprime N…` or `pi N…` from `sieve`; the exit code is 0, or 2 for
/// a bad query.
fn answer(sieve: &Sieve, query: &str, numbers: &[String]) -> i32 {
    for arg in numbers {
        let Ok(n) = arg.parse::<usize>() else {
            eprintln!("zygote: '{arg}' is not a number");
            return 2;
        };
        let reply = match query {
            "isprime" => sieve
                .is_prime(n)
                .map(|p| format!("{n} is {}prime", if p { "" } else { "not " })),
            "pi" => sieve.pi(n).map(|count| format!("pi({n}) = {count}")),
            _ => {
                eprintln!("zygote: unknown query '{query}' (isprime or pi)");
                return 2;
            }
        };
        match reply {
            Some(line) => println!("{line}"),
            None => {
                eprintln!("zygote: {n} is beyond the table (limit {})", sieve.limit());
                return 2;
            }
        }
    }
    0
}

fn sieve_limit() -> usize {
    std::env::var("ZYGOTE_SIEVE_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_LIMIT)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("query") {
        // The cold path: build the table, answer, exit.
        let started = Instant::now();
        let sieve = Sieve::build(sieve_limit());
        let query = args.get(2).map_or("", String::as_str);
        let code = answer(&sieve, query, &args[3.min(args.len())..]);
        eprintln!("zygote: cold query took {:.0?}", started.elapsed());
        return ExitCode::from(code as u8);
    }
    Server::builder()
        .preload("sieve", || Sieve::build(sieve_limit()))
        .worker("isprime", |ctx| {
            answer(ctx.preloaded("sieve"), "isprime", ctx.args())
        })
        .worker("pi", |ctx| answer(ctx.preloaded("sieve"), "pi", ctx.args()))
        .run()
}
