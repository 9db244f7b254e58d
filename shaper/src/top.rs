//! `shaper top` on a terminal: the groups table refreshed in place, with rates per
//! second between refreshes. `q` (or Esc, or Ctrl-C) quits; the terminal is restored
//! whatever happens.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Row, Table},
};
use shaper::protocol::{Response, TopGroup};

use crate::render::{TOP_HEADER, top_rows};

/// Run until the user quits. `first` is the reply already asked for; `ask` asks again.
pub fn live(
    first: Response,
    ask: impl Fn() -> Result<Response>,
    interval: Duration,
    rule: Option<&str>,
) -> Result<ExitCode> {
    let mut terminal = ratatui::init();
    let result = run(&mut terminal, first, ask, interval, rule);
    ratatui::restore();
    result
}

fn run(
    terminal: &mut DefaultTerminal,
    first: Response,
    ask: impl Fn() -> Result<Response>,
    interval: Duration,
    rule: Option<&str>,
) -> Result<ExitCode> {
    let mut reply = Ok(first);
    let mut prev: Option<(Vec<TopGroup>, Instant)> = None;
    loop {
        let now = Instant::now();
        let (groups, error) = match reply {
            Ok(Response::Top { groups }) => (groups, None),
            Ok(Response::Error { message }) => (Vec::new(), Some(message)),
            Ok(_) => (Vec::new(), Some("unexpected reply".to_string())),
            // The daemon may be restarting: say so and keep trying, as `top` would.
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
        let rows = top_rows(
            prev.as_ref()
                .map(|(g, at)| (g.as_slice(), now.duration_since(*at).as_secs_f64())),
            &groups,
        );
        terminal.draw(|f| draw(f, &rows, error.as_deref(), interval, rule))?;
        if error.is_none() {
            prev = Some((groups, now));
        }
        let deadline = now + interval;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if event::poll(left)?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
                && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL)))
            {
                return Ok(ExitCode::SUCCESS);
            }
        }
        reply = ask();
    }
}

fn draw(
    f: &mut Frame,
    rows: &[Vec<String>],
    error: Option<&str>,
    interval: Duration,
    rule: Option<&str>,
) {
    let [title, body] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(f.area());
    let what = rule.map_or("all rules".to_string(), |r| format!("rule {r}"));
    let status = match error {
        Some(e) => Line::styled(format!("shaper top: {e}"), Style::default().fg(Color::Red)),
        None => Line::from(format!(
            "shaper top: {} groups ({what}), per second over {:.1} s; q quits",
            rows.len(),
            interval.as_secs_f64()
        )),
    };
    f.render_widget(status, title);
    let widths: Vec<Constraint> = (0..TOP_HEADER.len())
        .map(|c| {
            let w = rows
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .chain([TOP_HEADER[c].len()])
                .max()
                .unwrap_or(1);
            Constraint::Length(u16::try_from(w).unwrap_or(u16::MAX))
        })
        .collect();
    let header = Row::new(TOP_HEADER).style(Style::default().add_modifier(Modifier::BOLD));
    let table = Table::new(rows.iter().map(|r| Row::new(r.clone())), widths)
        .header(header)
        .column_spacing(2)
        .block(Block::default());
    f.render_widget(table, body);
}
