
'use strict';
// The status page: polls /v1/health, /v1/aliases and /v1/failures every 2 s and refreshes at once on each
// event of the /v1/events stream (read with fetch, which can send the key; EventSource cannot). The key,
// when auth is on, lives in sessionStorage and travels only in the Authorization header, never in a URL.
// Everything shown is set as text (never parsed as HTML).
(() => {
  const POLL_MS = 2000;
  const STORE = 'manaproxy.key';
  const authOn = document.querySelector('meta[name="manaproxy-auth"]').content === 'on';
  const $ = (id) => document.getElementById(id);
  let key = authOn ? sessionStorage.getItem(STORE) : null;
  let lostSince = null;
  let lastUpdate = null;
  let timer = null;
  let streaming = false;  // an event stream is open now
  const events = [];

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const LABELS = {failure: 'rejected', success: 'applied'};  // a reload's result
  const pill = (status, text) =>
    el('span', {class: 'pill', 'data-status': status}, text || LABELS[status] || status.replace('_', ' '));
  const clock = (unix) => unix ? new Date(unix * 1000).toLocaleTimeString([], {hour12: false}) : '—';
  const ago = (unix) => unix ? span(Date.now() / 1000 - unix) : '';
  function span(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
    return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
  }
  const duration = (seconds) => seconds < 1 ? Math.round(seconds * 1000) + ' ms' : seconds.toFixed(1) + ' s';

  class AuthError extends Error {}
  function headers() {
    return key ? {Authorization: 'Bearer ' + key} : {};
  }
  async function get(path) {
    const response = await fetch(path, {headers: headers(), cache: 'no-store', credentials: 'omit'});
    if (response.status === 401) throw new AuthError('key refused');
    if (!response.ok) throw new Error(path + ': HTTP ' + response.status);
    return response.json();
  }

  // -- rendering ---------------------------------------------------------------------------------------
  function setIcon(status) {
    const colour = getComputedStyle(document.documentElement).getPropertyValue('--' + status).trim() || '#888';
    const svg = "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'><circle cx='8' cy='8' r='7' fill='" +
      colour + "'/></svg>";
    $('icon').href = 'data:image/svg+xml,' + encodeURIComponent(svg);
  }

  function entryStatus(entry) {
    return entry.available ? 'healthy' : entry.reason;
  }
  function aliasStatus(alias) {
    if (!alias.serving) return 'unhealthy';
    const kept = alias.entries.some((e) => !e.available && e.reason !== 'unconfigured');
    return kept ? 'degraded' : 'healthy';
  }
  function entryChip(entry, serving) {
    const status = entryStatus(entry);
    const until = (entry.until_unix ? ' until ' + clock(entry.until_unix) : '')
      + (entry.retry_unix ? ', next try ' + clock(entry.retry_unix) : '');
    const weight = entry.weight !== undefined && entry.weight !== 1 ? ' ×' + entry.weight : '';
    return el('span', {class: 'entry' + (serving ? ' serving' : ''), 'data-status': status, 'data-target': entry.target},
      el('span', {class: 'mono'}, entry.target + weight), ' ', pill(status), until ? el('span', {class: 'dim small'}, until) : null);
  }
  function hedgeText(hedge) {
    if (!hedge) return null;
    if (hedge.after !== 'auto') return 'hedge after ' + hedge.after + ' s (max ' + hedge.max + ')';
    const d = hedge.delay_seconds;
    const fmt = (v) => v === null ? 'learning' : v + ' s';
    return 'hedge auto: stream ' + fmt(d.stream) + ', unstreamed ' + fmt(d.unstreamed) + ' (max ' + hedge.max + ')';
  }
  function renderAliases(view) {
    const cards = view.aliases.map((alias) => {
      const status = aliasStatus(alias);
      const chain = el('div', {class: 'chain'});
      const steps = new Map();
      alias.entries.forEach((entry, index) => {
        const step = entry.step !== undefined ? entry.step : index;
        if (!steps.has(step)) steps.set(step, []);
        steps.get(step).push(entry);
      });
      let first = true;
      for (const entries of steps.values()) {
        if (!first) chain.append(el('span', {class: 'arrow'}, '→'));
        first = false;
        const chips = entries.map((entry) => entryChip(entry, entry.target === alias.serving));
        chain.append(entries.length > 1 ? el('span', {class: 'pool', title: 'pool'}, chips) : chips[0]);
      }
      return el('div', {class: 'card', 'data-status': status, 'data-alias': alias.name},
        el('div', {class: 'row'},
          el('span', {class: 'name'}, alias.name), pill(status),
          alias.name === view.default ? el('span', {class: 'dim small'}, 'default') : null,
          el('span', {class: 'small'}, 'serving: ', el('span', {class: 'mono'}, alias.serving || 'nothing — requests get 503')),
          hedgeText(alias.hedge) ? el('span', {class: 'dim small'}, hedgeText(alias.hedge)) : null),
        alias.description ? el('div', {class: 'dim small'}, alias.description) : null,
        chain);
    });
    $('aliases').replaceChildren(...(cards.length ? cards : [el('p', {class: 'none'}, 'no aliases configured')]));
  }

  function breakerLine(item) {
    const parts = [el('span', {class: 'small'}, 'breaker ' + item.breaker.replace('_', '-'))];
    const since = item.since_unix ? 'since ' + clock(item.since_unix) + ' (' + ago(item.since_unix) + ')' : 'since start';
    parts.push(el('span', {class: 'dim small'}, since));
    if (item.consecutive_failures) parts.push(el('span', {class: 'small'}, item.consecutive_failures + ' failures in a row'));
    if (item.unhealthy_until_unix) parts.push(el('span', {class: 'small'}, 'kept out until ' + clock(item.unhealthy_until_unix)));
    return parts;
  }
  function renderProviders(view) {
    const cards = Object.entries(view.providers).map(([name, item]) => {
      const models = Object.entries(item.models || {}).map(([model, m]) =>
        el('div', {class: 'model', 'data-status': m.status, 'data-model': name + '/' + model},
          el('div', {class: 'row'}, el('span', {class: 'mono'}, model), pill(m.status), breakerLine(m),
            el('span', {class: 'dim small'}, 'in flight ' + m.in_flight)),
          m.last_error ? el('div', {class: 'mono small ' + (m.status === 'healthy' ? 'dim' : 'error')}, m.last_error) : null));
      const limit = item.max_concurrent ? '/' + item.max_concurrent : '';
      return el('div', {class: 'card', 'data-status': item.status, 'data-provider': name},
        el('div', {class: 'row'},
          el('span', {class: 'name'}, name), pill(item.status), el('span', {class: 'dim small'}, item.kind),
          breakerLine(item),
          el('span', {class: 'small'}, 'in flight ' + item.in_flight + limit),
          item.last_latency_seconds !== null ? el('span', {class: 'dim small'}, 'last ' + duration(item.last_latency_seconds)) : null),
        item.last_error ? el('div', {class: 'mono small ' + (item.status === 'healthy' ? 'dim' : 'error')}, 'last error: ' + item.last_error) : null,
        models.length ? el('div', {class: 'models'}, models) : null);
    });
    $('providers').replaceChildren(...cards);
  }

  function attemptChip(attempt) {
    const status = attempt.tried ? 'unhealthy' : (attempt.reason === 'unconfigured' ? 'unconfigured' : attempt.reason);
    return el('span', {class: 'entry', 'data-status': status},
      el('span', {class: 'mono'}, attempt.target), ' ', attempt.reason.replace('_', ' '));
  }
  function renderFailures(view) {
    const items = view.failures.map((f) => {
      const status = f.status >= 400 || (f.outcome && f.outcome !== 'completed') ? 'unhealthy' : 'degraded';
      return el('div', {class: 'card', 'data-status': status, 'data-request-id': f.request_id},
        el('div', {class: 'row small'},
          el('span', {}, clock(f.time_unix)), pill(status, String(f.status)),
          el('span', {class: 'mono'}, f.alias || f.model || '(default)'),
          f.resolved ? el('span', {class: 'dim'}, '→ ', el('span', {class: 'mono'}, f.resolved)) : null,
          f.error ? el('span', {class: 'error'}, f.error) : null,
          f.outcome && f.outcome !== 'completed' ? el('span', {class: 'error'}, 'stream ' + f.outcome.replace('_', ' ')) : null,
          el('span', {class: 'dim'}, duration(f.duration_seconds)),
          f.client ? el('span', {class: 'dim'}, f.client) : null,
          el('span', {class: 'dim mono', title: 'X-Request-ID'}, f.request_id)),
        f.attempts.length ? el('div', {class: 'attempts'}, f.attempts.map(attemptChip)) : null);
    });
    $('failcount').textContent = '(' + view.failures.length + ' kept, last ' + view.capacity + ')';
    $('failures').replaceChildren(...(items.length ? items : [el('p', {class: 'none'}, 'none')]));
  }

  function renderReloads(reloads) {
    const items = reloads.map((r) => el('div', {class: 'card', 'data-status': r.result},
      el('div', {class: 'row small'}, el('span', {}, clock(r.time_unix)), pill(r.result),
        el('span', {class: 'dim'}, ago(r.time_unix) + ' ago')),
      r.error ? el('div', {class: 'mono small error'}, r.error) : null));
    $('reloads').replaceChildren(...(items.length ? items : [el('p', {class: 'none'}, 'none since start')]));
  }

  // What needs someone's attention, first: on a phone it is the whole first screen.
  function renderSummary(health, aliases, failures) {
    const lines = [];
    const line = (status, what, ...rest) =>
      lines.push(el('div', {class: 'card', 'data-status': status}, el('div', {class: 'row small'}, pill(status), el('span', {class: 'name'}, what), ...rest)));
    const when = (item) => item.status === 'unhealthy' || item.status === 'rate_limited'
      ? (item.unhealthy_until_unix ? 'until ' + clock(item.unhealthy_until_unix) : '') : '';
    for (const [name, item] of Object.entries(health.providers)) {
      if (item.status !== 'healthy' && item.status !== 'unconfigured') {
        line(item.status, name, el('span', {class: 'dim'}, 'since ' + clock(item.since_unix) + ' ' + when(item)),
          item.last_error ? el('span', {class: 'mono error'}, item.last_error) : null);
      }
      for (const [model, m] of Object.entries(item.models || {})) {
        if (m.status !== 'healthy') {
          line(m.status, name + '/' + model, el('span', {class: 'dim'}, 'since ' + clock(m.since_unix) + ' ' + when(m)),
            m.last_error ? el('span', {class: 'mono error'}, m.last_error) : null);
        }
      }
    }
    for (const alias of aliases.aliases) {
      if (!alias.serving) line('unhealthy', alias.name, el('span', {class: 'error'}, 'nothing can serve it: requests get 503'));
    }
    const reload = health.reloads[0];
    if (reload && reload.result !== 'success') {
      line('failure', 'last reload', el('span', {class: 'dim'}, clock(reload.time_unix) + ', the previous config serves'),
        el('span', {class: 'mono error'}, reload.error || ''));
    }
    const recent = failures.failures.filter((f) => Date.now() / 1000 - f.time_unix < 300).length;
    if (recent) line('degraded', recent + (recent === 1 ? ' request' : ' requests') + ' failed or fell back', el('span', {class: 'dim'}, 'in the last 5 minutes'));
    if (!lines.length) line('healthy', 'all is well', el('span', {class: 'dim'}, 'every configured provider healthy, nothing failed in the last 5 minutes'));
    $('summary').replaceChildren(...lines);
  }

  function renderMeta(health) {
    const p = health.process;
    $('meta').textContent = 'version ' + p.version + ' · up ' + span(p.uptime_seconds) + ' · config ' + p.config +
      ' · updated ' + clock(lastUpdate) + (streaming ? ' · live' : '');
    const overall = $('overall');
    overall.dataset.status = health.status;
    overall.textContent = health.status;
    document.title = health.status + ' · manaproxy';
    setIcon(health.status);
  }

  function renderEvents() {
    const items = events.map((e) => el('div', {class: 'card', 'data-status': e.status},
      el('div', {class: 'row small'}, el('span', {}, clock(e.time)), el('span', {class: 'name'}, e.kind), el('span', {class: 'mono'}, e.text))));
    if (items.length) $('events').replaceChildren(...items);
  }

  // -- the loop ---------------------------------------------------------------------------------------
  function showLost(error) {
    if (lostSince === null) lostSince = Date.now() / 1000;
    const lost = $('lost');
    lost.textContent = 'Lost contact with manaproxy since ' + clock(lostSince) + ' (' + error + '); retrying every 2 s.' +
      (lastUpdate ? ' What follows is from ' + clock(lastUpdate) + '.' : '');
    lost.hidden = false;
    $('overall').dataset.status = 'unknown';
    $('overall').textContent = 'no contact';
    setIcon('unknown');
  }
  function askForKey(message) {
    key = null;
    sessionStorage.removeItem(STORE);
    $('data').hidden = true;
    $('keyform').hidden = false;
    const error = $('keyerror');
    error.textContent = message || '';
    error.hidden = !message;
    $('key').focus();
  }

  // One refresh at a time: a timer or an event asks for one; one asked for while another runs follows it.
  let running = false;
  let again = false;
  let listening = false;
  async function refresh() {
    clearTimeout(timer);
    timer = null;
    quick = false;
    if (authOn && !key) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      const [health, aliases, failures] = await Promise.all([get('/v1/health'), get('/v1/aliases'), get('/v1/failures')]);
      lastUpdate = Date.now() / 1000;
      lostSince = null;
      $('lost').hidden = true;
      $('keyform').hidden = true;
      $('data').hidden = false;
      renderMeta(health);
      renderSummary(health, aliases, failures);
      renderAliases(aliases);
      renderProviders(health);
      renderFailures(failures);
      renderReloads(health.reloads);
      if (!listening) listen();
    } catch (error) {
      if (error instanceof AuthError) askForKey('That key was refused.');
      else showLost(error.message || String(error));
    } finally {
      running = false;
      if (!(authOn && !key)) {
        clearTimeout(timer);
        timer = setTimeout(refresh, again ? 150 : POLL_MS);
      }
      again = false;
    }
  }
  let quick = false;  // a refresh is due in a moment: events meanwhile need no other
  function soon() {
    if (running) {
      again = true;
    } else if (!quick) {
      quick = true;
      clearTimeout(timer);
      timer = setTimeout(refresh, 150);
    }
  }

  function describe(kind, data) {
    if (kind === 'transition') return {status: data.status, text: data.provider + ' ' + data.status};
    if (kind === 'reload') return {status: data.result, text: data.result === 'success' ? 'applied' : 'rejected: ' + (data.error || '')};
    const where = data.alias || data.model || '(default)';
    return {status: data.status >= 400 ? 'unhealthy' : 'degraded',
      text: data.status + ' ' + where + (data.attempts.length ? ' after ' + data.attempts.map((a) => a.target + ' ' + a.reason).join(', ') : '')};
  }
  function onEvent(block) {
    let kind = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) kind = line.slice(6).trim();
      else if (line.startsWith('data:')) data.push(line.slice(5).trim());
    }
    if (!data.length) return;
    const parsed = JSON.parse(data.join('\n'));
    events.unshift({time: parsed.time_unix, kind, ...describe(kind, parsed)});
    events.length = Math.min(events.length, 30);
    renderEvents();
    soon();
  }
  async function listen() {
    if (authOn && !key) {
      listening = false;  // started again by the next refresh that has a key
      return;
    }
    listening = streaming = true;
    try {
      const response = await fetch('/v1/events', {headers: headers(), cache: 'no-store', credentials: 'omit'});
      if (!response.ok) throw new Error('HTTP ' + response.status);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          onEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      // The 2 s poll goes on meanwhile; the stream is tried again below.
    }
    streaming = false;
    setTimeout(listen, 5000);
  }

  $('keyform').addEventListener('submit', (event) => {
    event.preventDefault();
    const value = $('key').value.trim();
    if (!value) return;
    key = value;
    sessionStorage.setItem(STORE, key);
    $('key').value = '';
    $('keyform').hidden = true;
    refresh();
  });
  if (authOn && !key) askForKey();
  else refresh();
})();
