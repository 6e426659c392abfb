// Node-RED settings for the benchmark: no editor, loopback only, warnings only.
// benchmarks/run.py sets NODE_RED_PORT (the admin HTTP port, unused), TCP_PORT, INFLUX_URL, MEASUREMENT.
module.exports = {
    uiHost: "127.0.0.1",
    uiPort: parseInt(process.env.NODE_RED_PORT || "1880", 10),
    httpAdminRoot: false,
    httpNodeRoot: false,
    credentialSecret: false,
    flowFilePretty: false,
    logging: { console: { level: "warn", metrics: false, audit: false } },
    editorTheme: { tours: false },
    functionExternalModules: false,
};
