"""`mmca bench`: measurements of the engine, of data parallelism and of search, kept out of the
library they measure. Each part takes a typed options object (`mmca.bench.options`) and logs
lines and returns a JSON-able dict of figures."""
