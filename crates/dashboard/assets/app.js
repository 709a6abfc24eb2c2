// The qlora dashboard page: polls /api/runs and the selected runs' /api/runs/NAME/metrics once a second and
// draws the curves as SVG. No framework, nothing fetched from elsewhere.
'use strict';

const POLL_MS = 1000;
const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#be185d', '#4d7c0f', '#7c3aed', '#b45309'];
const SVG = 'http://www.w3.org/2000/svg';

const state = {
  runs: [],              // summaries, as /api/runs gives them
  curves: new Map(),     // name -> {generation, train, trainTail, eval, evalTail}
  selected: new Set(),
  touched: false,        // the user chose the selection: stop choosing it for them
  expanded: new Set(),
  colors: new Map(),
  smoothing: 0.6,
};

// ---------- formatting ----------

function fmt(v, digits = 4) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return v.toFixed(digits);
}

function fmtCompact(v) {
  if (!Number.isFinite(v)) return '';
  const a = Math.abs(v);
  if (a === 0) return '0';
  if (a >= 1e9) return (v / 1e9).toPrecision(3).replace(/\.?0+$/, '') + 'G';
  if (a >= 1e6) return (v / 1e6).toPrecision(3).replace(/\.?0+$/, '') + 'M';
  if (a >= 1e4) return (v / 1e3).toPrecision(3).replace(/\.?0+$/, '') + 'k';
  if (a < 1e-3) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

function fmtEta(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '–';
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, '0')}m`;
  if (m > 0) return `${m}m ${String(r).padStart(2, '0')}s`;
  return `${r}s`;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function colorOf(name) {
  if (!state.colors.has(name)) state.colors.set(name, PALETTE[state.colors.size % PALETTE.length]);
  return state.colors.get(name);
}

// ---------- data ----------

async function getJSON(url) {
  const r = await fetch(url, { cache: 'no-store' });
  if (r.status === 404) return null;
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function fetchCurves(name) {
  const have = state.curves.get(name);
  let url = `api/runs/${encodeURIComponent(name)}/metrics`;
  if (have) url += `?generation=${have.generation}&train=${have.train.length}&eval=${have.eval.length}`;
  const r = await getJSON(url);
  if (r === null) { state.curves.delete(name); return; }
  const c = (have && !r.full) ? have : { train: [], eval: [] };
  c.train.push(...r.train);
  c.eval.push(...r.eval);
  c.trainTail = r.train_tail;
  c.evalTail = r.eval_tail;
  c.generation = r.generation;
  state.curves.set(name, c);
}

function chooseDefaultSelection() {
  if (state.touched) return;
  const running = state.runs.filter(r => r.status.state === 'running').map(r => r.name);
  if (running.length > 0) { state.selected = new Set(running); return; }
  const newest = [...state.runs].sort((a, b) => (b.updated_unix || 0) - (a.updated_unix || 0))[0];
  state.selected = new Set(newest ? [newest.name] : []);
}

async function tick() {
  try {
    const data = await getJSON('api/runs');
    state.runs = data ? data.runs : [];
    document.getElementById('root').textContent = data ? data.root : '';
    const names = new Set(state.runs.map(r => r.name));
    for (const n of [...state.selected]) if (!names.has(n)) state.selected.delete(n);
    for (const n of [...state.curves.keys()]) if (!names.has(n)) state.curves.delete(n);
    state.runs.forEach(r => colorOf(r.name));
    chooseDefaultSelection();
    await Promise.all([...state.selected].map(fetchCurves));
    renderTable();
    renderCharts();
    const live = document.getElementById('live');
    live.textContent = 'live · ' + new Date().toLocaleTimeString();
    live.className = 'muted';
  } catch (e) {
    const live = document.getElementById('live');
    live.textContent = 'not reachable: ' + e.message;
    live.className = 'warn';
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

// ---------- the run table ----------

function renderTable() {
  const body = document.querySelector('#runs tbody');
  const rows = [];
  for (const r of state.runs) {
    const t = r.last_train || {};
    const e = r.last_eval || {};
    const box = el('input', { type: 'checkbox', title: 'draw this run' });
    box.checked = state.selected.has(r.name);
    box.addEventListener('click', ev => {
      ev.stopPropagation();
      state.touched = true;
      if (box.checked) state.selected.add(r.name); else state.selected.delete(r.name);
      fetchCurves(r.name).then(renderCharts);
    });
    const notes = [];
    if (r.counts.malformed > 0) notes.push(`${r.counts.malformed} malformed line${r.counts.malformed > 1 ? 's' : ''} skipped`);
    if (r.read_bytes < r.metrics_bytes) notes.push(`reading ${Math.floor(100 * r.read_bytes / r.metrics_bytes)}%`);
    if (r.config_error) notes.push(r.config_error);
    const stepCell = el('td', { class: 'num' }, el('span', { class: 'step', text: r.step ?? '–' }));
    if (r.total_steps) stepCell.append(el('span', { class: 'muted', text: ` / ${r.total_steps}` }));
    const tr = el('tr', { class: 'run', 'data-run': r.name, onclick: () => toggleDetails(r.name) },
      el('td', {}, box, el('span', { class: 'swatch', style: `background:${colorOf(r.name)}` })),
      el('td', { class: 'name', text: r.name, title: r.name }),
      el('td', {}, el('span', { class: `badge ${r.status.state}`, text: r.status.state, title: r.status.detail || '' })),
      el('td', { class: 'clip', text: r.model ?? '–', title: r.model ?? '' }),
      el('td', { class: 'clip', text: r.data ?? '–', title: r.data ?? '' }),
      stepCell,
      el('td', { class: 'num eta', text: fmtEta(r.eta_seconds) }),
      el('td', { class: 'num loss', text: fmt(t.loss) }),
      el('td', { class: 'num eval-loss', text: fmt(e.loss), title: e.step !== undefined ? `step ${e.step}, perplexity ${fmt(e.perplexity, 3)}` : '' }),
      el('td', { class: 'num', text: t.lr !== undefined && t.lr !== null ? t.lr.toExponential(2) : '–' }),
      el('td', { class: 'num', text: fmt(t.tokens_per_s, 0) }),
      el('td', { class: 'num', text: fmt(t.peak_rss_mib, 0) }),
      el('td', { class: 'notes warn', text: notes.join('; '), title: r.counts.malformed_examples.join('\n') }));
    rows.push(tr);
    if (state.expanded.has(r.name)) rows.push(detailsRow(r));
  }
  body.replaceChildren(...rows);
  document.getElementById('empty').hidden = state.runs.length > 0;
}

function toggleDetails(name) {
  if (state.expanded.has(name)) state.expanded.delete(name); else state.expanded.add(name);
  renderTable();
}

function detailsRow(r) {
  const settings = el('div', { class: 'settings' });
  const config = r.config || {};
  for (const k of Object.keys(config).sort()) {
    const v = config[k];
    settings.append(el('div', { text: `${k} = ${typeof v === 'object' ? JSON.stringify(v) : v}` }));
  }
  if (Object.keys(config).length === 0) settings.append(el('div', { class: 'muted', text: 'no train_config.toml' }));
  const td = el('td', { colspan: '13' }, settings);
  if (r.status.detail) td.prepend(el('p', { class: 'warn', text: r.status.detail }));
  for (const m of r.counts.malformed_examples) td.append(el('div', { class: 'warn', text: m }));
  return el('tr', { class: 'details' }, td);
}

// ---------- charts ----------

function smooth(points, w) {
  let last = 0, n = 0;
  return points.map(([x, y]) => {
    last = last * w + (1 - w) * y;
    n += 1;
    return [x, w > 0 ? last / (1 - Math.pow(w, n)) : y];
  });
}

// Each chart: a title and, per run, the lines to draw ([[step, value], ...] with a style).
const CHARTS = [
  { id: 'loss', title: 'training loss (raw, smoothed)', lines: (c) => {
      const raw = pts(c.train, c.trainTail, 'loss');
      return [{ points: raw, opacity: 0.3, width: 1 }, { points: smooth(raw, state.smoothing), width: 2, label: 'smoothed' }];
    } },
  { id: 'eval', title: 'held-out loss', lines: (c) => [{ points: pts(c.eval, c.evalTail, 'loss'), width: 2, dots: true }] },
  { id: 'ppl', title: 'held-out perplexity', lines: (c) => [{ points: pts(c.eval, c.evalTail, 'perplexity'), width: 2, dots: true }] },
  { id: 'lr', title: 'learning rate', lines: (c) => [{ points: pts(c.train, c.trainTail, 'lr'), width: 1.5 }] },
  { id: 'grad', title: 'gradient norm before clipping', lines: (c) => [{ points: pts(c.train, c.trainTail, 'grad_norm'), width: 1.5 }] },
  { id: 'tps', title: 'tokens / s', lines: (c) => [{ points: pts(c.train, c.trainTail, 'tokens_per_s'), width: 1.5 }] },
  { id: 'mem', title: 'peak memory (MiB)', lines: (c) => [{ points: pts(c.train, c.trainTail, 'peak_rss_mib'), width: 1.5 }] },
  { id: 'paged', title: 'paged optimizer bytes per step (in —, out - -)', lines: (c) => [
      { points: pts(c.train, c.trainTail, 'paged_in_bytes'), width: 1.5, label: 'in' },
      { points: pts(c.train, c.trainTail, 'paged_out_bytes'), width: 1.5, dash: '5 3', label: 'out' }] },
  { id: 'state', title: 'optimizer state bytes', lines: (c) => [{ points: pts(c.train, c.trainTail, 'optimizer_state_bytes'), width: 1.5 }] },
];

function pts(kept, tail, key) {
  const out = [];
  for (const p of kept) if (Number.isFinite(p[key])) out.push([p.step, p[key]]);
  if (tail && Number.isFinite(tail[key])) out.push([tail.step, tail[key]]);
  return out;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  return ticks;
}

function renderCharts() {
  const host = document.getElementById('charts');
  if (host.children.length !== CHARTS.length) {
    host.replaceChildren(...CHARTS.map(c => el('div', { class: 'chart', id: `chart-${c.id}` })));
  }
  const runs = state.runs.filter(r => state.selected.has(r.name) && state.curves.has(r.name));
  for (const chart of CHARTS) {
    const series = [];
    for (const r of runs) {
      for (const line of chart.lines(state.curves.get(r.name))) {
        if (line.points.length > 0) series.push({ ...line, run: r.name, color: colorOf(r.name) });
      }
    }
    drawChart(document.getElementById(`chart-${chart.id}`), chart.title, series);
  }
}

function drawChart(box, title, series) {
  const W = Math.max(300, box.clientWidth - 8), H = 230, L = 58, R = 12, T = 24, B = 26;
  const s = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none' });
  const t = svg('text', { x: L, y: 15, class: 'title' });
  t.textContent = title;
  s.append(t);
  const all = series.flatMap(x => x.points);
  if (all.length === 0) {
    const none = svg('text', { x: W / 2, y: H / 2, class: 'none', 'text-anchor': 'middle' });
    none.textContent = 'no data yet';
    s.append(none);
    box.replaceChildren(s);
    return;
  }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; } else { const d = (y1 - y0) * 0.05; y0 -= d; y1 += d; }
  const X = v => L + (v - x0) / (x1 - x0) * (W - L - R);
  const Y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const axis = svg('g', { class: 'axis' });
  for (const v of niceTicks(y0, y1, 5)) {
    axis.append(svg('line', { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: 'grid' }));
    const lbl = svg('text', { x: L - 5, y: Y(v) + 3, 'text-anchor': 'end' });
    lbl.textContent = fmtCompact(v);
    axis.append(lbl);
  }
  for (const v of niceTicks(x0, x1, 6).filter(v => Number.isInteger(v))) {
    axis.append(svg('line', { x1: X(v), x2: X(v), y1: T, y2: H - B, class: 'grid' }));
    const lbl = svg('text', { x: X(v), y: H - B + 14, 'text-anchor': 'middle' });
    lbl.textContent = fmtCompact(v);
    axis.append(lbl);
  }
  s.append(axis, svg('rect', { x: L, y: T, width: W - L - R, height: H - T - B, class: 'frame' }));
  for (const line of series) {
    const d = line.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(' ');
    const attrs = { points: d, fill: 'none', stroke: line.color, 'stroke-width': line.width, 'stroke-opacity': line.opacity ?? 1 };
    if (line.dash) attrs['stroke-dasharray'] = line.dash;
    s.append(svg('polyline', attrs));
    if (line.dots || line.points.length === 1) {
      for (const [x, y] of line.points) s.append(svg('circle', { cx: X(x), cy: Y(y), r: 2.5, fill: line.color }));
    }
  }
  const cursor = svg('line', { y1: T, y2: H - B, class: 'cursor', visibility: 'hidden' });
  s.append(cursor);
  const tip = document.getElementById('tooltip');
  s.addEventListener('mousemove', ev => {
    const rect = s.getBoundingClientRect();
    const step = x0 + ((ev.clientX - rect.left) * W / rect.width - L) / (W - L - R) * (x1 - x0);
    const lines = [];
    let at = null;
    for (const line of series) {
      if (line.opacity !== undefined) continue; // the raw loss under its smoothed line
      const p = nearest(line.points, step);
      if (!p) continue;
      at = at ?? p[0];
      lines.push(`${line.run}${line.label ? ' (' + line.label + ')' : ''}: ${fmtCompact(p[1])} @ ${p[0]}`);
    }
    if (at === null) return;
    cursor.setAttribute('x1', X(at)); cursor.setAttribute('x2', X(at)); cursor.setAttribute('visibility', 'visible');
    tip.textContent = lines.join('\n');
    tip.style.whiteSpace = 'pre';
    tip.style.left = `${ev.clientX + 12}px`;
    tip.style.top = `${ev.clientY + 12}px`;
    tip.hidden = false;
  });
  s.addEventListener('mouseleave', () => { tip.hidden = true; cursor.setAttribute('visibility', 'hidden'); });
  box.replaceChildren(s);
}

function nearest(points, x) {
  if (points.length === 0) return null;
  let lo = 0, hi = points.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < x) lo = mid + 1; else hi = mid;
  }
  if (lo > 0 && Math.abs(points[lo - 1][0] - x) < Math.abs(points[lo][0] - x)) lo -= 1;
  return points[lo];
}

// ---------- start ----------

document.getElementById('smoothing').addEventListener('input', ev => {
  state.smoothing = Number(ev.target.value);
  document.getElementById('smoothing-value').textContent = state.smoothing.toFixed(2);
  renderCharts();
});
window.addEventListener('resize', renderCharts);
tick();
