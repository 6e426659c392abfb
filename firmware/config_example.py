# Board settings; `sensorpipe firmware deploy` writes the board's config.py
# from this file, replacing the values it is given (docs/firmware.md).
# Every key but DEVICE_ID and SERVER_HOST may be left out: lib/conf.py has
# the defaults shown here and checks every value at boot.

DEVICE_ID = "greenhouse-1"  # letters, digits . _ : - (the server's device id)
DEVICE_TOKEN = None  # the token `sensorpipe devices add greenhouse-1` printed (None: a port with auth = "off")
SERVER_HOST = "192.168.1.10"  # the sensorpipe server
TEXT_PORT = 7000  # JSON / kv lines, status lines and commands
BINARY_PORT = 7002  # binary packets
TRANSPORT = "json"  # json | kv | binary
DEVICE_NUMBER = 1  # binary: the server's [binary.devices.N]

WIFI = [("my-network", "secret")]  # tried in order; (ssid, password, timeout_s) sets a timeout
WIFI_TIMEOUT_S = 15  # per network
WIFI_ROUNDS_BATTERY = 2  # battery: rounds over WIFI per wake before giving up

MEASURE_S = 60  # seconds between readings
BATTERY = False  # deep sleep between readings (needs TRANSPORT = "binary")
WAKE_S = 600  # battery: send the buffered readings this often

DHT_TYPE = 22  # 11 | 22 | 0 (none)
DHT_PIN = 4  # GPIO4 = D2 on a NodeMCU / Wemos D1 mini
SOIL_ADC = 0  # ESP8266: ADC channel 0 (A0); ESP32: an ADC1 pin such as 34; None = none
VBAT_ADC = None  # None | "vcc" (ESP8266 supply voltage, A0 left free) | ADC pin
VBAT_SCALE = 1.0  # volts per ADC count, the voltage divider included
OUTPUT_PINS = ()  # pins the server may switch with a "relay" command, e.g. (5, 12)
LED_PIN = None  # for the "led" command; 2 on most ESP8266 boards
LED_ACTIVE_LOW = True

NTP_HOST = None  # e.g. "pool.ntp.org": lines then carry the reading's own time
CONNECT_TIMEOUT_S = 5
ACK_TIMEOUT_S = 10  # binary: how long to wait for the server's A
CMD_WAIT_MS = 1000  # battery: how long to listen for commands after sending
BACKLOG_MAX = 100  # always on: unsent lines kept while the server is away
BUFFER_RECORDS = None  # binary: records kept (None = what RTC memory holds, at most 255)
BOOT_GRACE_S = 3  # after a reset: time to reach the REPL before the firmware starts
DHT_RETRY_MS = 2000
SETTINGS_FILE = "settings.json"  # settings changed by server commands
DEVICE_KEY = None  # 64 hex digits: authenticates updates over the air (deploy writes it)
TLS_CA = None  # "ca.der": speak TLS, trusting the server by this certificate (deploy --tls-ca stages it)
TLS_HOST = None  # the name the server's certificate carries (None: SERVER_HOST)
OTA_BOOTS = 3  # a new version that has not reached the server in this many boots is rolled back
OTA_TRIAL_S = 600  # always on: a new version not confirmed by the server this long after boot resets
OTA_IDLE_MS = 3000  # battery: stay awake for an update while its chunks come at least this often
CRASH_WAIT_S = 10  # after a crash, wait this long before the reset (the traceback stays readable)
