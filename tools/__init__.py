"""Tools that are not the bot (benchmarks, model-file makers): they import the runtime packages,
never the other way round."""
