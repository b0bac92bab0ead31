// The billing page's script, served by the service itself (no CDN). It keeps the token in this tab's
// sessionStorage and sends it as Authorization: Bearer to the service's own APIs; nothing here computes an
// amount that the API gives: amounts are the API's integers of nano-USD, formatted exactly.
"use strict";
(() => {
  const TOKEN_KEY = "hfi-billing-token";
  const PAGE_SIZE = 50;
  const CSV_PAGE = 10000; // the API's largest page
  // The service's base URL: this script lives at <base>billing/static/billing.js, whatever the mount point.
  const BASE = new URL("../../", document.currentScript.src);

  const $ = (id) => document.getElementById(id);
  const state = { me: null, account: null, month: null, info: null, cursors: [null], page: 0, chartUrl: null, gen: 0 };
  // A newer view supersedes an older one still loading: its answers are dropped.
  class Superseded extends Error {}
  function current(gen) {
    if (gen !== state.gen) throw new Superseded();
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function describe(status, detail) {
    const said = detail ? ` (${detail})` : "";
    switch (status) {
      case 401: return `Your token was not accepted: it may be mistyped, expired or revoked. Sign in again${said}.`;
      case 402: return `Payment required${said}.`;
      case 403: return `Not allowed${said}.`;
      case 404: return `Not found${said}.`;
      case 400: case 409: case 422: return `The request was refused${said}.`;
      case 503: return `The service is temporarily unavailable, for example its database is down. Try again shortly${said}.`;
      default: return `The service answered with an error ${status}${said}.`;
    }
  }

  async function api(path, opts = {}) {
    const headers = { Accept: opts.accept || "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method: opts.method || "GET", headers, credentials: "omit", cache: "no-store" };
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.body);
    }
    let res;
    try {
      res = await fetch(new URL(path, BASE), init);
    } catch (err) {
      throw new ApiError(0, "The service cannot be reached. Check the connection and try again.");
    }
    if (!res.ok) {
      let detail = "";
      try {
        const body = await res.json();
        detail = typeof body.error === "string" ? body.error : JSON.stringify(body.error ?? body);
      } catch (err) {
        detail = "";
      }
      throw new ApiError(res.status, describe(res.status, detail));
    }
    return opts.raw ? res : res.json();
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
    return q.toString();
  }

  // Exact USD from an integer of nano-USD (the API's numbers): "$1.234567890".
  function usd(nanousd) {
    if (nanousd === null || nanousd === undefined) return "—";
    const n = BigInt(nanousd);
    const neg = n < 0n;
    const digits = (neg ? -n : n).toString().padStart(10, "0");
    return `${neg ? "-" : ""}$${digits.slice(0, -9)}.${digits.slice(-9)}`;
  }

  // "5.25" -> 5250000000 (exactly: no binary floating point); "" -> null; anything else throws.
  function parseUsd(text) {
    const t = text.trim().replace(/^\$/, "");
    if (t === "") return null;
    const m = /^(\d{1,9})(?:\.(\d{1,9}))?$/.exec(t);
    if (!m) throw new Error("The limit must be an amount in USD such as 5 or 0.25, with at most 9 decimal places.");
    return Number(BigInt(m[1]) * 1000000000n + BigInt((m[2] || "").padEnd(9, "0")));
  }

  function showMessage(text, ok = false) {
    const box = $("message");
    box.textContent = text;
    box.classList.toggle("ok", ok);
    box.hidden = false;
  }

  function clearMessage() {
    $("message").hidden = true;
    $("message").textContent = "";
  }

  function announce(text) {
    $("status").textContent = text;
  }

  function fail(err) {
    if (err instanceof Superseded) return;
    if (err instanceof ApiError && err.status === 401) {
      signOut(false);
    }
    showMessage(err.message || String(err));
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
  }

  function fillRows(tableId, rows, columns) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const tr = body.insertRow();
      const td = document.createElement("td");
      td.colSpan = columns.length;
      td.textContent = "Nothing this month.";
      tr.appendChild(td);
      return;
    }
    for (const r of rows) {
      const tr = body.insertRow();
      for (const [fn, cls] of columns) cell(tr, fn(r), cls);
    }
  }

  // --- signing in and out

  function showSignedOut() {
    $("sign-in").hidden = false;
    $("dashboard").hidden = true;
    $("who").hidden = true;
  }

  function signOut(announceIt = true) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.me = null;
    showSignedOut();
    if (announceIt) {
      clearMessage();
      announce("Signed out.");
    }
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    clearMessage();
    const input = $("token");
    const token = input.value.trim();
    input.value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    await start();
  }

  async function start() {
    try {
      state.me = await api("billing/me");
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignedOut();
      showMessage(err.message);
      return;
    }
    const me = state.me;
    $("who-name").textContent = me.is_admin ? `${me.name} (administrator)` : me.name;
    $("who").hidden = false;
    $("sign-in").hidden = true;
    $("dashboard").hidden = false;
    const select = $("account");
    select.replaceChildren();
    for (const a of me.accounts) {
      const label = a.kind === "org" ? `${a.name} (organization${a.admin ? ", admin" : ""})` : `${a.name} (you)`;
      select.appendChild(new Option(label, a.name));
    }
    select.disabled = me.accounts.length === 0;
    $("other-field").hidden = !me.is_admin;
    $("month").value = state.month || me.month;
    announce(`Signed in as ${me.name}.`);
    if (me.accounts.length) await show();
    else showMessage("Administrator: type an account's name under “Another account” and choose Show.", true);
  }

  // --- the month view

  function chosenAccount() {
    const other = $("other-account").value.trim();
    return other || $("account").value;
  }

  async function show(event) {
    if (event) event.preventDefault();
    clearMessage();
    state.account = chosenAccount();
    state.month = $("month").value;
    state.cursors = [null];
    state.page = 0;
    if (!state.account) {
      showMessage("Choose an account.");
      return;
    }
    const gen = ++state.gen;
    const board = $("dashboard");
    board.setAttribute("aria-busy", "true");
    board.removeAttribute("data-view");
    try {
      await Promise.all([loadReport(gen), loadAccount(gen), loadChart(gen)]);
      board.dataset.view = `${state.account} ${state.month}`; // what is on screen, once all of it is
      announce(`Showing ${state.account}, ${state.month}.`);
    } catch (err) {
      if (err instanceof Superseded) return;
      fail(err);
    } finally {
      if (gen === state.gen) board.removeAttribute("aria-busy");
    }
  }

  async function loadReport(gen = state.gen) {
    const cursor = state.cursors[state.page];
    const r = await api(`billing/usage?${query({ account: state.account, month: state.month, limit: PAGE_SIZE, cursor })}`);
    current(gen);
    $("summary-account").textContent = r.account;
    $("summary-month").textContent = r.month;
    const total = $("month-total");
    total.textContent = `$${r.total_usd}`; // the API's exact string, as is
    total.dataset.nanousd = String(r.total_nanousd);
    $("included-used").textContent = `${usd(r.included_used_nanousd)} of ${usd(r.included_credits_nanousd)}`;
    $("included-left").textContent = usd(r.included_left_nanousd);
    $("payg").textContent = usd(r.pay_as_you_go_nanousd);
    $("limit").textContent = r.spending_limit_nanousd === null ? "No limit" : usd(r.spending_limit_nanousd);
    $("requests").textContent = String(r.requests);
    $("plan-note").textContent = `Plan or tier: ${r.tier}.` +
      (r.in_flight_reserved_nanousd ? ` Requests running now hold ${usd(r.in_flight_reserved_nanousd)}.` : "");
    const money = (x) => usd(x.cost_nanousd);
    fillRows("by-model", r.by_model, [[(x) => x.model_id], [(x) => String(x.requests), "num"], [money, "num"]]);
    fillRows("by-profile", r.by_hardware_profile, [[(x) => x.hardware_profile], [(x) => String(x.requests), "num"], [money, "num"]]);
    $("members-section").hidden = !r.by_member;
    if (r.by_member) fillRows("by-member", r.by_member, [[(x) => x.user], [(x) => String(x.requests), "num"], [money, "num"]]);
    fillRows("daily-table", r.by_day, [[(x) => x.day], [money, "num"]]);
    fillRows("charges", r.charges, [
      [(x) => x.started_at.replace("T", " ").replace("+00:00", "")],
      [(x) => x.user], [(x) => x.model_id], [(x) => x.hardware_profile],
      [money, "num"], [(x) => x.request_id, "id"],
    ]);
    $("charges-note").textContent = r.charges_user
      ? `As a member, you see your own charges (${r.charges_user}); the totals are the organization's.`
      : "";
    state.cursors[state.page + 1] = r.next_cursor;
    $("prev-page").disabled = state.page === 0;
    $("next-page").disabled = !r.next_cursor;
    $("page-label").textContent = `Page ${state.page + 1}`;
  }

  async function loadAccount(gen = state.gen) {
    const info = await api(`billing/account?${query({ name: state.account })}`);
    current(gen);
    state.info = info;
    const can = Boolean(info.can_manage);
    $("limit-fieldset").disabled = !can;
    $("limit-usd").value = info.spending_limit_nanousd === null || info.spending_limit_nanousd === undefined
      ? "" : usd(info.spending_limit_nanousd).slice(1);
    let note = can ? "" : "Only the account's administrators can change these settings.";
    if (info.note) note = info.note;
    else if (info.pay_as_you_go === false) note += " This plan has no pay-as-you-go: the limit has no effect until it has.";
    $("settings-note").textContent = note.trim();
    const models = $("models-fieldset");
    models.hidden = info.kind !== "org";
    models.disabled = !can;
    if (info.kind === "org") renderModels(info.disabled_models || []);
  }

  function renderModels(disabled) {
    const off = new Set(disabled.map((m) => m.toLowerCase()));
    const list = $("models-list");
    list.replaceChildren();
    state.me.models.forEach((model, i) => {
      const li = document.createElement("li");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = `model-${i}`;
      box.checked = !off.has(model.toLowerCase());
      box.dataset.model = model;
      box.addEventListener("change", () => toggleModel(box));
      const label = document.createElement("label");
      label.htmlFor = box.id;
      label.textContent = ` ${model}`;
      li.append(box, label);
      list.appendChild(li);
    });
  }

  function modelPath(model) {
    return model.split("/").map(encodeURIComponent).join("/");
  }

  async function toggleModel(box) {
    clearMessage();
    const org = state.info.name;
    const model = box.dataset.model;
    const path = `admin/orgs/${encodeURIComponent(org)}/disabled-models/${modelPath(model)}`;
    try {
      await api(path, { method: box.checked ? "DELETE" : "PUT" });
      announce(`${model} ${box.checked ? "enabled" : "disabled"} for ${org}.`);
    } catch (err) {
      box.checked = !box.checked;
      fail(err);
    }
  }

  async function saveLimit(event) {
    event.preventDefault();
    clearMessage();
    let limit;
    try {
      limit = parseUsd($("limit-usd").value);
      if (limit !== null && !Number.isSafeInteger(limit)) throw new Error("That limit is too large.");
    } catch (err) {
      showMessage(err.message);
      $("limit-usd").focus();
      return;
    }
    try {
      await api(`admin/accounts/${encodeURIComponent(state.account)}/spending-limit`, {
        method: "PUT", body: { spending_limit_nanousd: limit },
      });
      await Promise.all([loadReport(), loadAccount()]);
      showMessage(limit === null ? "The spending limit was removed." : `The spending limit is now ${usd(limit)}.`, true);
    } catch (err) {
      fail(err);
    }
  }

  async function loadChart(gen = state.gen) {
    const res = await api(`billing/chart.svg?${query({ account: state.account, month: state.month })}`, { accept: "image/svg+xml", raw: true });
    const svg = await res.blob();
    current(gen);
    if (state.chartUrl) URL.revokeObjectURL(state.chartUrl);
    state.chartUrl = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
    const img = $("chart");
    img.src = state.chartUrl;
    img.alt = `Bar chart of the daily spend of ${state.account} in ${state.month}; the same figures are in the table below.`;
    $("chart-caption").textContent = "Spend per UTC day. Hover a bar for its exact amount, or open the table.";
  }

  async function page(delta) {
    clearMessage();
    state.page = Math.max(0, state.page + delta);
    try {
      await loadReport();
      announce(`Charges, page ${state.page + 1}.`);
    } catch (err) {
      fail(err);
    }
  }

  // The month's charges as the API's CSV: one page of at most CSV_PAGE charges, or several joined (one header,
  // the total row at the end).
  async function downloadCsv() {
    clearMessage();
    try {
      const parts = [];
      let cursor = null;
      do {
        const res = await api(`billing/usage?${query({ account: state.account, month: state.month, format: "csv", limit: CSV_PAGE, cursor })}`, { accept: "text/csv", raw: true });
        parts.push(await res.text());
        cursor = res.headers.get("x-next-cursor");
      } while (cursor);
      const text = parts.map((p, i) => {
        let lines = p.split("\n");
        if (lines[lines.length - 1] === "") lines = lines.slice(0, -1);
        if (i > 0) lines = lines.slice(1); // the header once
        if (i < parts.length - 1) lines = lines.slice(0, -1); // the total row once, at the end
        return lines.join("\n") + "\n";
      }).join("");
      const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
      const a = document.createElement("a");
      a.href = url;
      a.download = `billing-${state.account}-${state.month}.csv`;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      announce("CSV downloaded.");
    } catch (err) {
      fail(err);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(true));
    $("view-form").addEventListener("submit", show);
    $("limit-form").addEventListener("submit", saveLimit);
    $("prev-page").addEventListener("click", () => page(-1));
    $("next-page").addEventListener("click", () => page(1));
    $("download-csv").addEventListener("click", downloadCsv);
    $("account").addEventListener("change", () => { $("other-account").value = ""; show(); });
    if (sessionStorage.getItem(TOKEN_KEY)) start();
    else showSignedOut();
  });
})();
