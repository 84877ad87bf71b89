// The search page of `retrieval serve`: text -> images, image -> images + captions, more like this.
// Plain JS, no dependencies. Talks only to /api/v1 on the server that serves it.
'use strict';

(() => {
  const K = 24;                            // results per panel
  const MAX_UPLOAD = 16 * 1024 * 1024;     // bytes of an image file we are willing to send
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $('search'), q: $('q'), file: $('file'), index: $('index'), home: $('home'),
    error: $('error'), status: $('status'), progress: $('progress'),
    query: $('query'), queryImage: $('query-image'), queryText: $('query-text'),
    imagesPanel: $('images-panel'), images: $('images'), imagesTitle: $('images-title'),
    captionsPanel: $('captions-panel'), captions: $('captions'), captionsTitle: $('captions-title'),
    intro: $('intro'), drop: $('drop'), panels: $('panels'),
  };
  const startUrl = new URLSearchParams(location.search);
  const apiKey = startUrl.get('key') || '';
  const uploads = new Map();               // history entry id -> {dataUrl, name}: uploads are not put in URLs
  let controller = null;                   // aborts the search in flight when a new one starts
  let defaultIndex = null;

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  // ---- talking to the server -------------------------------------------------------------

  async function api(path, body, signal) {
    const headers = body === undefined ? {} : { 'Content-Type': 'application/json' };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    let response;
    try {
      response = await fetch(path, {
        method: body === undefined ? 'GET' : 'POST', headers, signal,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (err.name === 'AbortError') throw err;
      throw new ApiError('cannot reach the server: is `retrieval serve` still running?', 0);
    }
    if (response.ok) return response.json();
    throw new ApiError(await errorMessage(response), response.status);
  }

  async function errorMessage(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      const payload = await response.json();
      if (payload && typeof payload.error === 'string') message = payload.error;
      else if (payload && payload.detail) message = JSON.stringify(payload.detail);
    } catch (_) { /* not JSON: keep the status line */ }
    if (response.status === 401 || response.status === 403) {
      message += apiKey ? ' (the key given in ?key= was refused)' : ' (this server needs an API key: open the page with ?key=YOUR_KEY)';
    }
    return message;
  }

  function withIndex(path, index) {
    return index ? `${path}${path.includes('?') ? '&' : '?'}index=${encodeURIComponent(index)}` : path;
  }

  function search(state, target, query, signal) {
    const body = { index: state.index || null, target, k: K, queries: [query], exclude_self: true };
    return api('api/v1/search', body, signal);
  }

  // ---- state <-> URL ---------------------------------------------------------------------

  // A state is {type: 'text', text} | {type: 'like', id, kind} | {type: 'upload', upload} | {type: 'none'}, plus index.
  function stateFromLocation() {
    const params = new URLSearchParams(location.search);
    const index = params.get('index') || null;
    const id = params.get('like');
    if (params.get('q')) return { type: 'text', text: params.get('q'), index };
    if (id !== null && /^\d+$/.test(id)) return { type: 'like', id: Number(id), kind: params.get('kind') || 'image', index };
    const upload = history.state && history.state.upload;
    if (upload && uploads.has(upload)) return { type: 'upload', upload, index };
    return { type: 'none', index };
  }

  function urlFor(state) {
    const params = new URLSearchParams();
    if (state.type === 'text') params.set('q', state.text);
    if (state.type === 'like') {
      params.set('like', String(state.id));
      if (state.kind !== 'image') params.set('kind', state.kind);
    }
    if (state.index) params.set('index', state.index);
    if (apiKey) params.set('key', apiKey);
    const query = params.toString();
    return query ? `?${query}` : location.pathname;
  }

  function remember(state) {
    const entry = state.type === 'upload' ? { upload: state.upload } : {};
    const url = urlFor(state);
    if (url !== (location.search || location.pathname) || state.type === 'upload') history.pushState(entry, '', url);
  }

  // ---- running a search ------------------------------------------------------------------

  async function run(state, { push = true } = {}) {
    if (controller) controller.abort();
    if (push) remember(state);
    el.q.value = state.type === 'text' ? state.text : '';
    if (state.type === 'none') { clearResults(); return; }
    controller = new AbortController();
    const signal = controller.signal;
    setBusy(true, state);
    const started = performance.now();
    try {
      showQuery(state, signal);
      const query = queryOf(state);
      const wantCaptions = state.type !== 'text';
      const [images, captions] = await Promise.all([
        search(state, 'image', query, signal),
        wantCaptions ? search(state, 'caption', query, signal) : null,
      ]);
      if (signal.aborted) return;
      renderImages(images.results[0].hits);
      renderCaptions(captions ? captions.results[0].hits : null);
      const count = images.results[0].hits.length + (captions ? captions.results[0].hits.length : 0);
      say(`${count} results from ${images.index} in ${Math.round(performance.now() - started)} ms`);
    } catch (err) {
      if (err.name === 'AbortError') return;
      showError(`Search failed: ${err.message}`);
    } finally {
      if (!signal.aborted) setBusy(false);
    }
  }

  function queryOf(state) {
    if (state.type === 'text') return { text: state.text };
    if (state.type === 'like') return { item: { kind: state.kind, id: state.id } };
    return { image: uploads.get(state.upload).dataUrl };
  }

  function showQuery(state, signal) {
    el.query.hidden = state.type === 'text';
    el.queryImage.hidden = true;
    el.queryImage.removeAttribute('src');
    if (state.type === 'upload') {
      const upload = uploads.get(state.upload);
      el.queryImage.src = upload.dataUrl;
      el.queryImage.alt = `Query image ${upload.name}`;
      el.queryImage.hidden = false;
      el.queryText.textContent = `Images and captions like ${upload.name}`;
    } else if (state.type === 'like') {
      el.queryText.textContent = `More like ${state.kind} ${state.id}`;
      if (state.kind === 'image') {
        setImage(el.queryImage, withIndex(`api/v1/thumbnails/${state.id}`, state.index), signal);
        el.queryImage.alt = `Query image ${state.id}`;
        el.queryImage.hidden = false;
      }
      api(withIndex(`api/v1/items/${state.kind}/${state.id}`, state.index), undefined, signal)
        .then((item) => { el.queryText.textContent = `More like ${item.caption || basename(item.uri || `${state.kind} ${state.id}`)}`; })
        .catch(() => { /* the search itself reports a bad id */ });
    }
  }

  // ---- rendering -------------------------------------------------------------------------

  function renderImages(hits) {
    el.imagesPanel.hidden = false;
    el.imagesTitle.textContent = hits.length ? `Images (${hits.length})` : 'Images: no results';
    el.images.replaceChildren(...hits.map(imageHit));
  }

  function renderCaptions(hits) {
    el.captionsPanel.hidden = hits === null;
    el.panels.classList.toggle('two', hits !== null);
    if (hits === null) { el.captions.replaceChildren(); return; }
    el.captionsTitle.textContent = hits.length ? `Captions (${hits.length})` : 'Captions: no results';
    el.captions.replaceChildren(...hits.map(captionHit));
  }

  function imageHit(hit) {
    const name = hit.caption || basename(hit.uri || `image ${hit.id}`);
    const button = hitButton(hit, `More like ${name}, score ${score(hit)}`);
    const img = document.createElement('img');
    img.alt = name;
    img.loading = 'lazy';
    img.decoding = 'async';
    if (hit.width && hit.height) { img.width = hit.width; img.height = hit.height; }
    if (hit.thumbnail) setImage(img, hit.thumbnail);
    button.append(img, meta(score(hit), name));
    button.title = hit.uri || name;
    button.addEventListener('click', () => run({ type: 'like', id: hit.id, kind: 'image', index: currentIndex() }));
    return listItem(button);
  }

  function captionHit(hit) {
    const button = hitButton(hit, `Search images for: ${hit.caption}, score ${score(hit)}`);
    if (hit.thumbnail) {
      const img = document.createElement('img');
      img.alt = '';
      img.loading = 'lazy';
      setImage(img, hit.thumbnail);
      button.append(img);
    }
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = hit.caption;
    button.append(text, meta(score(hit), ''));
    button.addEventListener('click', () => run({ type: 'text', text: hit.caption, index: currentIndex() }));
    return listItem(button);
  }

  function hitButton(hit, label) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'hit';
    button.dataset.id = hit.id;
    button.dataset.kind = hit.kind;
    button.setAttribute('aria-label', label);
    return button;
  }

  function meta(scoreText, name) {
    const span = document.createElement('span');
    span.className = 'meta';
    const s = document.createElement('span');
    s.className = 'score';
    s.textContent = scoreText;
    span.append(s);
    if (name) {
      const n = document.createElement('span');
      n.className = 'name';
      n.textContent = name;
      span.append(n);
    }
    return span;
  }

  function listItem(child) {
    const li = document.createElement('li');
    li.append(child);
    return li;
  }

  const score = (hit) => (typeof hit.score === 'number' ? hit.score.toFixed(3) : '');
  const basename = (uri) => String(uri).split(/[\\/]/).pop();

  // Thumbnails: a plain src, or fetched with the key when the server needs one (an <img> cannot send headers).
  function setImage(img, url, signal) {
    img.onerror = () => img.classList.add('broken');
    if (!apiKey) { img.src = url; return; }
    fetch(url, { headers: { Authorization: `Bearer ${apiKey}` }, signal })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
      .then((blob) => { img.src = URL.createObjectURL(blob); img.onload = () => URL.revokeObjectURL(img.src); })
      .catch(() => img.classList.add('broken'));
  }

  // ---- status, errors, loading -----------------------------------------------------------

  function say(text) { el.status.textContent = text; }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
    say('');
  }

  function setBusy(busy, state) {
    el.progress.hidden = !busy;
    el.panels.setAttribute('aria-busy', String(busy));
    el.panels.classList.toggle('loading', busy);
    if (busy) {
      el.error.hidden = true;
      el.intro.hidden = true;
      say(state.type === 'text' ? `Searching for “${state.text}”…` : 'Searching…');
    }
  }

  function clearResults() {
    el.images.replaceChildren();
    el.captions.replaceChildren();
    el.imagesPanel.hidden = true;
    el.captionsPanel.hidden = true;
    el.query.hidden = true;
    el.error.hidden = true;
    el.intro.hidden = false;
    setBusy(false);
    say('');
  }

  // The index searched: the picker's choice once the list has loaded (null = the server's default), else the URL's.
  function currentIndex() {
    if (defaultIndex === null) return stateFromLocation().index;
    return el.index.value && el.index.value !== defaultIndex ? el.index.value : null;
  }

  // ---- the index picker ------------------------------------------------------------------

  async function loadIndexes() {
    try {
      const data = await api('api/v1/indexes');
      defaultIndex = data.default;
      const wanted = stateFromLocation().index || data.default;
      el.index.replaceChildren(...data.indexes.map((info) => {
        const option = new Option(`${info.name} (${info.images} images, ${info.captions} captions)`, info.name);
        option.selected = info.name === wanted;
        return option;
      }));
      el.index.disabled = data.indexes.length < 2;
      if (!data.indexes.some((info) => info.name === wanted)) showError(`No index named “${wanted}” on this server`);
    } catch (err) {
      el.index.replaceChildren(new Option('unavailable', ''));
      showError(`Cannot list the indexes: ${err.message}`);
    }
  }

  function onIndexChange() {
    const state = stateFromLocation();
    state.index = el.index.value === defaultIndex ? null : el.index.value;
    if (state.type === 'none') { remember(state); return; }
    run(state);
  }

  // ---- image input: pick, drop, paste ----------------------------------------------------

  function searchWithFile(file) {
    if (!file) return;
    if (!file.type.startsWith('image/')) { showError(`${file.name || 'That file'} is not an image`); return; }
    if (file.size > MAX_UPLOAD) { showError(`${file.name} is too large (${Math.round(file.size / 1048576)} MB; at most 16 MB)`); return; }
    const reader = new FileReader();
    reader.onload = () => {
      const upload = `u${Date.now()}${Math.random().toString(36).slice(2, 6)}`;
      uploads.set(upload, { dataUrl: reader.result, name: file.name || 'pasted image' });
      run({ type: 'upload', upload, index: currentIndex() });
    };
    reader.onerror = () => showError(`Cannot read ${file.name}: ${reader.error}`);
    reader.readAsDataURL(file);
  }

  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types).includes('Files');

  function wireImageInput() {
    el.file.addEventListener('change', () => { searchWithFile(el.file.files[0]); el.file.value = ''; });
    window.addEventListener('dragover', (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      el.drop.hidden = false;
    });
    window.addEventListener('dragleave', (event) => { if (!event.relatedTarget) el.drop.hidden = true; });
    window.addEventListener('drop', (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      el.drop.hidden = true;
      searchWithFile(event.dataTransfer.files[0]);
    });
    document.addEventListener('paste', (event) => {
      const file = Array.from(event.clipboardData ? event.clipboardData.files : []).find((f) => f.type.startsWith('image/'));
      if (!file) return;
      event.preventDefault();
      searchWithFile(file);
    });
  }

  // ---- keyboard --------------------------------------------------------------------------

  function typing(target) {
    return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function onKey(event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === '/' && !typing(event.target)) {
      event.preventDefault();
      el.q.focus();
      el.q.select();
    } else if (event.key === 'Escape') {
      event.preventDefault();
      el.drop.hidden = true;
      run({ type: 'none', index: currentIndex() });
      el.q.focus();
    } else if (event.key === 'ArrowDown' && event.target === el.q) {
      const first = document.querySelector('.hit');
      if (first) { event.preventDefault(); first.focus(); }
    } else if (event.target instanceof HTMLElement && event.target.classList.contains('hit')) {
      moveFocus(event);
    }
  }

  // Arrow keys between results: left/right one step, up/down one row of the grid (one step in the caption list).
  function moveFocus(event) {
    const list = event.target.closest('ol');
    const buttons = Array.from(list.querySelectorAll('.hit'));
    const at = buttons.indexOf(event.target);
    const row = list === el.images ? columns(buttons) : 1;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -row, ArrowDown: row }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    const next = at + step;
    if (next < 0) { el.q.focus(); return; }
    if (next >= buttons.length && event.key === 'ArrowRight' && list === el.images && !el.captionsPanel.hidden) {
      const caption = el.captions.querySelector('.hit');
      if (caption) caption.focus();
      return;
    }
    buttons[Math.min(next, buttons.length - 1)].focus();
  }

  function columns(buttons) {
    if (!buttons.length) return 1;
    const top = buttons[0].getBoundingClientRect().top;
    const first = buttons.findIndex((b) => b.getBoundingClientRect().top > top + 1);
    return first === -1 ? buttons.length : first;
  }

  // ---- start -----------------------------------------------------------------------------

  function start() {
    el.form.addEventListener('submit', (event) => {
      event.preventDefault();
      const text = el.q.value.trim();
      if (!text) { el.q.focus(); return; }
      run({ type: 'text', text, index: currentIndex() });
    });
    el.home.addEventListener('click', (event) => {
      event.preventDefault();
      run({ type: 'none', index: currentIndex() });
      el.q.focus();
    });
    el.index.addEventListener('change', onIndexChange);
    document.addEventListener('keydown', onKey);
    window.addEventListener('popstate', () => run(stateFromLocation(), { push: false }));
    wireImageInput();
    loadIndexes();
    const state = stateFromLocation();
    if (state.type === 'none') el.q.focus();
    run(state, { push: false });
  }

  start();
})();
