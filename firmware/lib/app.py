# The firmware's main loop, in two modes (config.BATTERY):
#
# always on: measure every MEASURE_S and send at once over the chosen
#   TRANSPORT (json / kv lines on a kept-open text connection, or binary
#   packets answered by `A`). Unsent readings wait in a bounded backlog; any
#   socket error closes the connection and the next send reconnects (after a
#   backoff). Between readings the text connection is read for commands.
# battery: each wake takes one reading into a buffer kept in RTC memory and
#   deep-sleeps for MEASURE_S; every WAKE_S it connects, sends the whole
#   buffer as one binary packet, clears it only after the server's `A`, sends
#   a status line (rssi, mem_free, dropped) and listens CMD_WAIT_MS for
#   commands.
#
# Connects to: SERVER_HOST:TEXT_PORT (text lines, commands) and
# SERVER_HOST:BINARY_PORT (one packet per connection).

import commands
import conf as confmod
import devauth
import link
import otaboot
import packet
import ringbuf
import wifi

POLL_MS = 200
MIN_SLEEP_MS = 1000


def log(msg):
    print(msg)


class App:
    def __init__(self, config, hw=None):
        if hw is None:
            import hw
        self.hw = hw
        self.config = config
        self.settings_file = getattr(config, "SETTINGS_FILE", "settings.json")
        self.settings = confmod.read_settings(self.settings_file)
        self.conf = c = confmod.load(config, self.settings)
        self.wifi = wifi.Wifi(hw.sta() if c.WIFI else None, c.WIFI, c.WIFI_TIMEOUT_S, hw, log)
        self.tls = link.tls_from(c.TLS_CA, c.TLS_HOST or c.SERVER_HOST)
        self.text = link.TextLink(c.SERVER_HOST, c.TEXT_PORT, c.CONNECT_TIMEOUT_S, devauth.hello(c), self.tls)
        self.server_backoff = wifi.Backoff(hw)
        self.recent = commands.Recent()
        self.backlog = ringbuf.Backlog(c.BACKLOG_MAX)
        self.buffer = None
        self.clock_synced = False
        self.read_now = False
        self.reboot = False
        self.outputs_restored = False
        self.started_at = self.next_at = hw.ticks_ms()
        # lib/ota.py is imported only when an update needs it (an ESP8266 has little RAM)
        self.updater = None
        self.swapped = False  # a new version is in place: reset (battery: sleep) into it
        self.on_trial = otaboot.read_json(otaboot.TRIAL) is not None
        # a new version on trial that the server has not confirmed by then resets (a boot counted)
        self.trial_until = hw.ticks_add(self.started_at, int(c.OTA_TRIAL_S * 1000)) if self.on_trial else None

    # ------------------------------------------------------------ readings

    def measure(self):
        c = self.conf
        hw = self.hw
        reading = []
        if c.DHT_TYPE:
            th = self._dht()
            reading.append(("temp", th[0]))
            reading.append(("humi", th[1]))
        if c.SOIL_ADC is not None:
            try:
                reading.append(("soil", hw.adc_read(c.SOIL_ADC)))
            except OSError:
                reading.append(("soil", None))
        if c.VBAT_ADC is not None:
            try:
                volts = hw.vbat_read(c.VBAT_ADC, c.VBAT_SCALE)
                if volts is not None:  # None: this board cannot read it
                    reading.append(("vbat", volts))
            except OSError:
                reading.append(("vbat", None))
        return reading

    def _dht(self):
        # A DHT needs 1-2 s between reads and after power-up: one retry.
        c = self.conf
        for attempt in (0, 1):
            try:
                return self.hw.dht_read(c.DHT_TYPE, c.DHT_PIN)
            except OSError as e:
                log("dht: %r" % (e,))
                if attempt == 0:
                    self.hw.sleep_ms(c.DHT_RETRY_MS)
        return None, None

    def board_figures(self, dropped):
        out = []
        rssi = self.hw.rssi()
        if rssi is not None:
            out.append(("rssi", rssi))
        mem = self.hw.mem_free()
        if mem is not None:
            out.append(("mem_free", mem))
        if dropped:
            out.append(("dropped", dropped))
        return out

    def queue(self, reading):
        c = self.conf
        if c.TRANSPORT == "binary":
            if self.buffer is None:
                self.buffer = ringbuf.RingBuffer(packet.RECORD_SIZE, c.BUFFER_RECORDS or packet.MAX_RECORDS)
            self.buffer.append(packet.record(reading))
            return
        # counts the line this one pushes out, too
        dropped = self.backlog.dropped + (len(self.backlog) >= self.backlog.limit)
        reading = reading + self.board_figures(dropped)
        encode = packet.json_line if c.TRANSPORT == "json" else packet.kv_line
        self.backlog.append(encode(c.DEVICE_ID, reading, self.hw.unix_time_ms()))

    def status_line(self, dropped):
        # binary mode's other figures: {"device":"ID","rssi":-61,"mem_free":21344,"dropped":0}
        return packet.json_line(self.conf.DEVICE_ID, self.board_figures(0) + [("dropped", dropped)])

    # ------------------------------------------------------------ always on

    def run(self, cycles=None):
        # Forever, or `cycles` readings (tests: the connection stays open for the next call).
        if not self.outputs_restored:
            self.restore_outputs()
        done = 0
        while cycles is None or done < cycles:
            self.idle()
            self.read_now = False
            self.next_at = self.hw.ticks_add(self.hw.ticks_ms(), int(self.conf.MEASURE_S * 1000))
            self.queue(self.measure())
            self.flush()
            done += 1

    def close(self):
        self.text.close()

    def idle(self):
        # Until the next reading is due. next_at is read anew on every turn: a
        # command applied meanwhile (interval, read) moves it, and the board
        # keeps to the new schedule from that moment, not when the old one ran out.
        hw = self.hw
        while not self.read_now:
            self.maybe_reboot()
            if self.trial_until is not None and hw.ticks_diff(hw.ticks_ms(), self.trial_until) > 0:
                log("ota: the server has not confirmed this version: reset")
                self.reboot = True
                continue
            left = hw.ticks_diff(self.next_at, hw.ticks_ms())
            if left <= 0:
                return
            if self.text.connected():
                try:
                    lines = self.text.lines(min(left, POLL_MS))
                except OSError:
                    log("server: connection closed")
                    continue
                for line in lines:
                    self.handle(line)
            else:
                hw.sleep_ms(min(left, POLL_MS))

    def flush(self):
        c = self.conf
        if not self.wifi.up():
            return
        if c.NTP_HOST and not self.clock_synced:
            self.clock_synced = self.hw.ntp_sync(c.NTP_HOST)
        if not self.server_backoff.ready():
            return
        try:
            if c.TRANSPORT == "binary":
                self.send_buffer(self.buffer)
                self.open_text()
                self.text.send(self.status_line(self.buffer.dropped))
            else:
                self.open_text()
                while len(self.backlog):
                    self.text.send(self.backlog.peek())
                    self.backlog.pop()
            self.server_backoff.succeeded()
        except OSError as e:
            self.text.close()
            self.server_backoff.failed()
            log("server: %r; %d waiting, next try in %d ms" % (
                e, len(self.buffer or self.backlog), self.server_backoff.delay_ms))
        self.maybe_reboot()

    def open_text(self):
        fresh = not self.text.connected()
        self.text.open()
        try:
            self.take_commands(0)
        except OSError:  # the server closed it while we were idle: one fresh connection
            self.text.open()
            fresh = True
        if fresh:
            self.report_update()

    def report_update(self):
        # After a swap the new version answers the swap command itself, on every
        # new connection until the server confirms it; a rollback is told once.
        pending = otaboot.pending_report()
        if pending is None:
            return
        cmd_id, error, version = pending
        self.ack(cmd_id, error, version)
        if error is not None:
            otaboot.rollback_reported()

    def send_buffer(self, buf):
        # Raises OSError unless the server acknowledged. Without a token buf is
        # cleared only after the `A`; with one, a packet sealed and not answered
        # is kept on flash and sent again byte for byte before anything new is
        # sealed (lib/devauth.py): its records leave buf once it is kept.
        c = self.conf
        if c.DEVICE_TOKEN:
            self.send_pending()
        if buf is None or not len(buf):
            return
        data = packet.binary_packet(c.DEVICE_NUMBER, buf.records(), c.WAKE_S if c.BATTERY else c.MEASURE_S,
                                    c.MEASURE_S)
        if not c.DEVICE_TOKEN:
            if not link.send_packet(c.SERVER_HOST, c.BINARY_PORT, data, c.CONNECT_TIMEOUT_S, c.ACK_TIMEOUT_S,
                                    self.tls):
                raise OSError(link.ETIMEDOUT, "no ack from the server")
            buf.clear()
            return
        devauth.keep(devauth.seal(c, data))
        buf.clear()
        if c.BATTERY:
            self.hw.rtc_save(buf.to_bytes())
        self.send_pending()

    def send_pending(self):
        # The sealed packet kept on flash, if any: cleared after its `A`.
        c = self.conf
        data, tries = devauth.pending()
        if data is None:
            return
        if link.send_packet(c.SERVER_HOST, c.BINARY_PORT, data, c.CONNECT_TIMEOUT_S, c.ACK_TIMEOUT_S, self.tls):
            devauth.answered()
            return
        tries += 1
        if tries >= devauth.PENDING_TRIES_MAX:
            records = max(0, len(data) - packet.HEADER_SIZE - devauth.TRAILER_SIZE) // packet.RECORD_SIZE
            log("server: a packet unanswered %d times set aside (%d records dropped)" % (tries, records))
            devauth.answered()
            if self.buffer is not None:
                self.buffer.dropped += records
        else:
            devauth.keep(data, tries)
        raise OSError(link.ETIMEDOUT, "no ack from the server")

    # ------------------------------------------------------------ commands

    def take_commands(self, wait_ms):
        lines = self.text.lines(wait_ms)
        for line in lines:
            self.handle(line)
        return len(lines)

    def handle(self, line):
        c = self.conf
        try:
            cmd_id, cmd, arg = commands.parse(line, c.OUTPUT_PINS, c.LED_PIN)
        except commands.CommandError as e:
            log("command %r: %s" % (line[:60], e.reason))
            return self.ack(e.cmd_id, e.reason)
        if cmd in commands.OTA_COMMANDS:
            return self.handle_update(cmd_id, cmd, arg)
        if self.recent.seen(cmd_id):
            return self.ack(cmd_id)
        try:
            error = self.apply(cmd, arg)
        except OSError as e:
            error = "failed: %r" % (e,)
        if error is None:
            self.recent.add(cmd_id)
            if cmd == "reboot":
                self.reboot = True
        log("command %s %s: %s" % (cmd, arg, error or "ok"))
        self.ack(cmd_id, error)

    def ack(self, cmd_id, error=None, version=None):
        line = packet.ack_line(self.conf.DEVICE_ID, cmd_id, error)
        if version is not None:  # the firmware version that answers (updates)
            line = line[:-2] + (',"fw":"%s"}\n' % version).encode()
        try:
            self.text.send(line)
        except OSError as e:
            log("ack: %r" % (e,))

    def get_updater(self):
        if self.updater is None:
            import ota
            self.updater = ota.Updater(self.conf.DEVICE_ID, devauth.ota_key(self.conf), log)
        return self.updater

    def updating(self):
        # a download under way
        return self.updater is not None and self.updater.busy()

    def handle_update(self, cmd_id, cmd, doc):
        # Each step is idempotent: a command sent again is answered the same way.
        version = doc["v"]
        updater = self.get_updater()
        error = None
        try:
            if cmd == "ota":
                updater.manifest(doc)
            elif cmd == "ota_chunk":
                updater.chunk(version, doc["f"], doc["o"], doc["d"])
            elif cmd == "ota_confirm":
                updater.confirm(version)
                self.trial_until = None
                self.on_trial = False
            else:
                done, error = updater.outcome(version)
                if not done:
                    updater.swap(version, cmd_id)
                    # answered by the new version after the reset (report_update)
                    self.swapped = True
                    if not self.conf.BATTERY:
                        self.reboot = True
                    return
        except updater.Error as e:
            error = str(e)
        except OSError as e:
            error = "flash: %r" % (e,)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            error = "bad update command: %r" % (e,)
        if error is not None:
            log("ota: %s: %s" % (cmd, error))
        self.ack(cmd_id, error, version if cmd in ("ota_swap", "ota_confirm") and error is None else None)

    def apply(self, cmd, arg):
        # None when done, else the reason it was not.
        if cmd == "interval" or cmd == "wake":
            changed = dict(self.settings)
            changed["MEASURE_S" if cmd == "interval" else "WAKE_S"] = arg
            try:
                self.conf = confmod.build(self.config, changed)
            except ValueError as e:
                return str(e)
            self.save_settings(changed)
            if cmd == "interval":
                self.next_at = self.hw.ticks_add(self.hw.ticks_ms(), arg * 1000)
        elif cmd == "relay":
            pin, on = arg
            self.hw.pin_write(pin, on)
            pins = dict(self.settings.get("pins") or {})
            pins[str(pin)] = on
            changed = dict(self.settings)
            changed["pins"] = pins
            self.save_settings(changed)
        elif cmd == "led":
            self.hw.pin_write(self.conf.LED_PIN, arg != self.conf.LED_ACTIVE_LOW)
            changed = dict(self.settings)
            changed["led"] = arg
            self.save_settings(changed)
        elif cmd == "read":
            self.read_now = True
        return None

    def save_settings(self, settings):
        self.settings = settings
        try:
            confmod.write_settings(self.settings_file, settings)
        except OSError as e:  # applied now, lost at the next reset
            log("settings: %r" % (e,))

    def restore_outputs(self):
        self.outputs_restored = True
        c = self.conf
        pins = self.settings.get("pins") or {}
        for pin in pins:
            if int(pin) in c.OUTPUT_PINS:
                self.hw.pin_write(int(pin), pins[pin])
        if c.LED_PIN is not None and "led" in self.settings:
            self.hw.pin_write(c.LED_PIN, self.settings["led"] != c.LED_ACTIVE_LOW)

    def maybe_reboot(self):
        if self.reboot:
            log("rebooting")
            self.text.close()
            self.hw.reset()

    # ------------------------------------------------------------ battery

    def wake(self):
        # One wake of a battery board; ends in deep sleep.
        c = self.conf
        hw = self.hw
        cap = c.BUFFER_RECORDS or ringbuf.capacity_for(hw.RTC_BYTES, packet.RECORD_SIZE)
        every = max(1, c.WAKE_S // c.MEASURE_S)
        buf = ringbuf.RingBuffer.from_bytes(hw.rtc_load(), packet.RECORD_SIZE, cap)
        if buf is None:  # power-on: send the first reading at once
            buf = ringbuf.RingBuffer(packet.RECORD_SIZE, cap)
            buf.meta = every - 1
        self.buffer = buf
        self.restore_outputs()
        buf.append(packet.record(self.measure()))
        buf.meta = min(buf.meta + 1, 0xFFFF)
        hw.rtc_save(buf.to_bytes())
        # a new version on trial connects at every wake until the server confirms it
        if buf.meta >= every or self.on_trial:
            buf.meta = 0
            self.battery_send(buf)
            hw.rtc_save(buf.to_bytes())
        if not self.swapped:  # a new version in place boots at the next wake, on time
            self.maybe_reboot()
        spent = hw.ticks_diff(hw.ticks_ms(), self.started_at)
        hw.deepsleep(max(int(self.conf.MEASURE_S * 1000) - spent, MIN_SLEEP_MS))

    def battery_send(self, buf):
        c = self.conf
        if not self.wifi.up_within(c.WIFI_ROUNDS_BATTERY):
            log("wifi: not connected; %d records kept" % len(buf))
            return
        try:
            self.send_buffer(buf)
        except OSError as e:
            pending = " and a sealed packet" if devauth.pending()[0] is not None else ""
            log("server: %r; %d records kept%s" % (e, len(buf), pending))
            return
        self.hw.rtc_save(buf.to_bytes())
        hw = self.hw
        try:
            self.text.open()
            self.text.send(self.status_line(buf.dropped))
            self.report_update()
            start = hw.ticks_ms()
            # a new version on trial waits longer, for the server's confirmation
            on_trial = self.trial_until is not None
            deadline = hw.ticks_add(start, max(c.CMD_WAIT_MS, c.OTA_IDLE_MS if on_trial else 0))
            while not self.reboot and not self.swapped:
                left = hw.ticks_diff(deadline, hw.ticks_ms())
                if left <= 0:
                    break
                if on_trial and self.trial_until is None and not self.updating() \
                        and hw.ticks_diff(hw.ticks_ms(), start) >= c.CMD_WAIT_MS:
                    break  # confirmed: back to the usual wait
                if self.take_commands(min(left, POLL_MS)) and self.updating():
                    # an update is coming: stay awake while its chunks do
                    deadline = hw.ticks_add(hw.ticks_ms(), max(c.CMD_WAIT_MS, c.OTA_IDLE_MS))
                self.measure_if_due(buf)
        except OSError as e:
            log("server: %r" % (e,))
        if self.read_now:  # a `read` command: send again at the next wake
            buf.meta = 0xFFFF
        self.text.close()

    def measure_if_due(self, buf):
        # Awake longer than MEASURE_S (an update downloading): the readings go on
        # at their times into the buffer, and the sleep after is shortened to match.
        hw = self.hw
        period = int(self.conf.MEASURE_S * 1000)
        if hw.ticks_diff(hw.ticks_ms(), self.started_at) >= period:
            self.started_at = hw.ticks_add(self.started_at, period)
            buf.append(packet.record(self.measure()))
            hw.rtc_save(buf.to_bytes())


def main(config=None):
    if config is None:
        import config
    app = App(config)
    if app.conf.BATTERY:
        app.wake()
    else:
        app.run()
